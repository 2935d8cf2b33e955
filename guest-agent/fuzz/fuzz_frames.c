/* libFuzzer harness: the agent channel's framing (src/frame.c) as channel.c drives it, and the decoding
 * of every tlv payload it yields. Input: two bytes seeding how the stream is cut into reads (as the
 * channel's reads may return any part of what the host sent), then the bytes the host sends.
 *
 * Checked beyond what the sanitizers catch: a frame's payload lies inside the reader's buffer, its
 * header passed the checks (length, type, direction, stream kind), the reader never asks for more room
 * than its buffer has, a bad header is a "protocol" failure with a one-line message, and every byte is
 * either in a frame or still buffered when the input ends. make -C guest-agent fuzz; docs/reliability.md. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "messages.h"
#include "protocol.h"

#define CHECK(cond)      \
    do {                 \
        if (!(cond))     \
            abort();     \
    } while (0)

static uint8_t storage[KP_HEADER_SIZE + KP_MAX_PAYLOAD];
static _Alignas(max_align_t) uint8_t msg[4096];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    uint32_t seed = (uint32_t)data[0] << 8 | data[1];
    data += 2;
    size -= 2;
    struct frame_reader r = FRAME_READER(storage);
    size_t fed = 0, framed = 0;
    for (;;) {
        size_t room;
        uint8_t *p = frame_reader_space(&r, &room);
        CHECK(p >= storage && p + room == storage + sizeof storage);
        seed = seed * 1103515245u + 12345u;
        size_t n = (seed >> 16) % 4 == 0 ? room : (seed >> 16) % 97 + 1; /* a whole read, or a short one */
        if (n > room)
            n = room;
        if (n > size - fed)
            n = size - fed;
        memcpy(p, data + fed, n);
        frame_reader_filled(&r, n);
        fed += n;

        struct frame fr;
        struct failure f;
        int rc;
        while ((rc = frame_reader_next(&r, &fr, &f)) > 0) {
            CHECK(fr.payload >= storage && fr.payload + fr.len <= storage + sizeof storage);
            CHECK(fr.len <= KP_MAX_PAYLOAD && strcmp(message_name(fr.type), "?") != 0);
            framed += KP_HEADER_SIZE + fr.len;
            const struct kp_msg_desc *d = kp_msg_desc_of(fr.type);
            if (d && kp_decode(d, msg, fr.payload, fr.len, &f) == 0)
                kp_free(d, msg);
        }
        if (rc < 0) {
            CHECK(strcmp(f.stage, "protocol") == 0 && f.msg[0] && !strchr(f.msg, '\n'));
            return 0; /* the agent powers off: nothing after a bad header is read */
        }
        if (fed == size)
            break;
    }
    CHECK(framed + (r.end - r.start) == size);
    return 0;
}
