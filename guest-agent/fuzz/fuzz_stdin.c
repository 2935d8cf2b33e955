/* libFuzzer harness: a process's stdin window (src/stdin_window.c), which holds the STDIN frames the
 * host sent until the app's pipe or pty takes them. Input: a list of operations, 3 bytes each: a STDIN
 * frame of N bytes arrives (N up to a little past the window), or the pipe takes N of the pending
 * bytes (a short write), or drops everything (the app closed its stdin).
 *
 * Checked beyond what the sanitizers catch, against a model (a plain FIFO of what was accepted): a frame
 * is refused ("protocol", one line) exactly when it would overrun KP_STDIN_WINDOW, and then changes
 * nothing; the pending bytes are always the model's, in order; the buffer never holds more than the
 * window. make -C guest-agent fuzz; docs/reliability.md. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "protocol.h"
#include "stdin_window.h"

#define CHECK(cond)      \
    do {                 \
        if (!(cond))     \
            abort();     \
    } while (0)

#define FRAME_MAX (KP_STDIN_WINDOW + 4096)
static uint8_t pattern[FRAME_MAX + 256]; /* pattern[i] == i % 256: a frame starting at byte `next` */
static uint8_t model[KP_STDIN_WINDOW];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct stdin_window w = {0};
    size_t model_len = 0;
    uint8_t next = 0; /* the bytes the host sends: a counter, so that order and loss show */
    if (!pattern[1])
        for (size_t j = 0; j < sizeof pattern; j++)
            pattern[j] = (uint8_t)j;
    for (size_t i = 0; i + 3 <= size; i += 3) {
        uint8_t op = data[i] % 4;
        size_t n = ((size_t)data[i + 1] << 8 | data[i + 2]) * (data[i] & 0x80 ? 5 : 1);
        if (op <= 1) { /* a STDIN frame */
            if (n > FRAME_MAX)
                n = FRAME_MAX;
            const uint8_t *frame = pattern + next;
            struct failure f;
            int rc = stdin_window_put(&w, 1, frame, n, &f);
            if (n > KP_STDIN_WINDOW - model_len) {
                CHECK(rc < 0 && strcmp(f.stage, "protocol") == 0 && f.msg[0] && !strchr(f.msg, '\n'));
            } else {
                CHECK(rc == 0);
                memcpy(model + model_len, frame, n);
                model_len += n;
                next = (uint8_t)(next + n);
            }
        } else if (op == 2) { /* the pipe takes some */
            size_t pending;
            stdin_window_pending(&w, &pending);
            stdin_window_taken(&w, n > pending ? pending : n);
            size_t taken = n > model_len ? model_len : n;
            memmove(model, model + taken, model_len - taken);
            model_len -= taken;
        } else if ((data[i + 1] & 0xf) == 0) { /* the app closed its stdin, now and then */
            stdin_window_free(&w);
            model_len = 0;
        }
        size_t pending;
        const uint8_t *p = stdin_window_pending(&w, &pending);
        CHECK(pending == model_len && pending <= KP_STDIN_WINDOW);
        CHECK(!pending || (p && memcmp(p, model, pending) == 0));
        CHECK(!w.buf || (w.off + w.len <= KP_STDIN_WINDOW));
    }
    stdin_window_free(&w);
    return 0;
}
