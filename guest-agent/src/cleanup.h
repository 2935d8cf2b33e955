/* Scope-bound resources, in crun's style: a variable declared with one of these is released when it goes
 * out of scope, on every return path. Set it to -1 / NULL to keep what it holds. */
#ifndef KVMPOD_CLEANUP_H
#define KVMPOD_CLEANUP_H

#include <stdlib.h>
#include <unistd.h>

static inline void cleanup_close(const int *fd)
{
    if (*fd >= 0)
        close(*fd);
}

static inline void cleanup_free(void *p)
{
    free(*(void **)p);
}

#define _cleanup_close_ __attribute__((cleanup(cleanup_close)))
#define _cleanup_free_ __attribute__((cleanup(cleanup_free)))

#endif
