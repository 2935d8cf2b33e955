/* Frames on the agent channel (protocol.toml): a 12-byte header, then the payload. The reader cuts
 * the byte stream the host sends into frames and checks each header as soon as it is there. A pure
 * module (no fd, no global state, nothing fatal), so that it can be tested and fuzzed on its own
 * (guest-agent/fuzz/); channel.c reads the channel into one. */
#ifndef KVMPOD_FRAME_H
#define KVMPOD_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

struct frame {
    uint16_t type;
    uint32_t stream;
    const uint8_t *payload; /* valid until the reader's next frame_reader_space() */
    uint32_t len;
};

/* buf holds one maximal frame (KP_HEADER_SIZE + KP_MAX_PAYLOAD bytes) at least, so a frame always fits
 * once the earlier ones are taken. */
struct frame_reader {
    uint8_t *buf;
    size_t cap;
    size_t start, end; /* unconsumed bytes are buf[start..end) */
};

#define FRAME_READER(storage) {.buf = (storage), .cap = sizeof(storage), .start = 0, .end = 0}

/* Moves the unconsumed bytes to the front; returns where the next bytes go, *room how many fit. */
uint8_t *frame_reader_space(struct frame_reader *r, size_t *room);

/* `n` bytes (at most *room) were put where frame_reader_space() said. */
void frame_reader_filled(struct frame_reader *r, size_t n);

/* Takes the next complete frame: 1 with *fr, 0 when more bytes are needed, -1 with *f (stage
 * "protocol") when its header breaks the protocol (size, type, flags, stream kind, direction): that
 * is judged from the header alone, so an oversized length is refused, never waited for. */
int frame_reader_next(struct frame_reader *r, struct frame *fr, struct failure *f);

/* The message's name ("?" for a type the protocol does not have). */
const char *message_name(uint16_t type);

#endif
