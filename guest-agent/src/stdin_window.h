/* A process's stdin on its way from the host to the process's pipe or pty: the bytes of STDIN frames
 * not written yet. The host may have at most KP_STDIN_WINDOW of them outstanding (WINDOW returns the
 * credit as they are written: docs/agent-protocol.md, flow control), so the buffer never grows past
 * that; more is a protocol error. Pure (no fd), so that it can be fuzzed alone (fuzz/fuzz_stdin.c). */
#ifndef KVMPOD_STDIN_WINDOW_H
#define KVMPOD_STDIN_WINDOW_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

struct stdin_window {
    uint8_t *buf; /* KP_STDIN_WINDOW bytes once the first arrive; NULL before */
    size_t off, len; /* the bytes not written yet are buf[off..off+len) */
};

/* Appends a STDIN frame's `n` bytes: 0, or -1 with *f (stage "protocol" when they overrun the window,
 * "request" with ENOMEM). */
int stdin_window_put(struct stdin_window *w, uint32_t stream, const uint8_t *data, size_t n, struct failure *f);

/* The bytes to write next (*n of them; 0 when there are none). */
const uint8_t *stdin_window_pending(const struct stdin_window *w, size_t *n);

/* `n` of the pending bytes were written. */
void stdin_window_taken(struct stdin_window *w, size_t n);

/* Drops what is left and the buffer. */
void stdin_window_free(struct stdin_window *w);

#endif
