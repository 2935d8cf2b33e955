/* The agent's C unit tests' one assertion: CHECK(cond, fmt, ...) counts a check, and on failure says
 * where, what and why, then goes on, so one run reports every failure. Each test is one translation
 * unit (the Makefile links tests/NAME.c alone with the agent's objects), hence the static counters. */
#ifndef KVMPOD_TEST_CHECK_H
#define KVMPOD_TEST_CHECK_H

#include <stdio.h>

static int failures, checks;

#define CHECK(cond, ...)                                                                                      \
    do {                                                                                                      \
        checks++;                                                                                             \
        if (!(cond)) {                                                                                        \
            failures++;                                                                                       \
            fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond);                                 \
            fprintf(stderr, __VA_ARGS__);                                                                     \
            fputc('\n', stderr);                                                                              \
        }                                                                                                     \
    } while (0)

#endif
