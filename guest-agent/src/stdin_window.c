#include "stdin_window.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "protocol.h"

int stdin_window_put(struct stdin_window *w, uint32_t stream, const uint8_t *data, size_t n, struct failure *f)
{
    if (n > KP_STDIN_WINDOW - w->len)
        return failf(f, "protocol", 0, "stream %u: STDIN overruns the %u-byte window", stream, KP_STDIN_WINDOW);
    if (!n)
        return 0;
    if (!w->buf && !(w->buf = malloc(KP_STDIN_WINDOW)))
        return failf(f, "request", ENOMEM, "out of memory");
    if (w->off + w->len + n > KP_STDIN_WINDOW) {
        memmove(w->buf, w->buf + w->off, w->len);
        w->off = 0;
    }
    memcpy(w->buf + w->off + w->len, data, n);
    w->len += n;
    return 0;
}

const uint8_t *stdin_window_pending(const struct stdin_window *w, size_t *n)
{
    *n = w->len;
    return w->len ? w->buf + w->off : NULL;
}

void stdin_window_taken(struct stdin_window *w, size_t n)
{
    if (n > w->len)
        n = w->len;
    w->off += n;
    w->len -= n;
    if (w->len == 0)
        w->off = 0;
}

void stdin_window_free(struct stdin_window *w)
{
    free(w->buf);
    *w = (struct stdin_window){0};
}
