/* TLV payloads: u16 tag | u32 length | value, little endian (protocol.toml). */
#ifndef KVMPOD_TLV_H
#define KVMPOD_TLV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util.h"

/* --- decoding (host -> guest; every access is bounds-checked) --- */

struct tlv_reader {
    const uint8_t *pos, *end;
};

struct tlv_field {
    uint16_t tag;
    uint32_t len;
    const uint8_t *value;
};

void tlv_reader_init(struct tlv_reader *r, const void *payload, size_t len);

/* Returns 1 with the next field, 0 at the end, -1 (stage "protocol") when the payload is malformed:
 * a truncated field, or a known fixed-width field of the wrong size. Unknown tags are returned
 * too; callers ignore tags they do not use, so a newer host may add optional fields. */
int tlv_next(struct tlv_reader *r, struct tlv_field *field, struct failure *f);

/* Value accessors; the width was checked by tlv_next. */
uint32_t tlv_u32(const struct tlv_field *field);
uint64_t tlv_u64(const struct tlv_field *field);

/* A malloc'ed C string copy of a str field; NULL (stage "protocol") if it holds a NUL byte
 * (which would silently cut a path or argument short) or memory runs out. */
char *tlv_strdup(const struct tlv_field *field, struct failure *f);

/* --- encoding (guest -> host) --- */

struct tlv_writer {
    uint8_t *buf;
    size_t cap, len;
};

#define TLV_WRITER(storage) {.buf = (storage), .cap = sizeof(storage), .len = 0}

/* Fields that do not fit are truncated (str) or dropped (fixed): writers size their buffers for
 * the messages they build, and a clipped diagnostic beats a frame the host rejects. */
void tlv_put_u32(struct tlv_writer *w, uint16_t tag, uint32_t v);
void tlv_put_i32(struct tlv_writer *w, uint16_t tag, int32_t v);
void tlv_put_u64(struct tlv_writer *w, uint16_t tag, uint64_t v);
void tlv_put_str(struct tlv_writer *w, uint16_t tag, const char *s);

#endif
