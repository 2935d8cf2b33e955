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

/* --- messages: the generated structs and tables (build/messages.h, messages.c) --- */

/* A repeated field's values: v[0..n) (NULL when n == 0). A str list ends with a NULL after them. */
struct kp_strs {
    char **v;
    size_t n;
};
struct kp_u32s {
    uint32_t *v;
    size_t n;
};
struct kp_i32s {
    int32_t *v;
    size_t n;
};
struct kp_u64s {
    uint64_t *v;
    size_t n;
};

#define KP_FIELD_REPEATED 1u
#define KP_FIELD_REQUIRED 2u

/* One field of a message, as protocol.toml lists it: where its value is in the message's struct. */
struct kp_field_desc {
    const char *name;    /* APP_NAME */
    uint16_t tag;        /* KP_F_* */
    uint8_t type;        /* enum kp_field_type */
    uint8_t flags;       /* KP_FIELD_* */
    uint16_t offset;     /* of the value (str: a char *), or of the list (struct kp_strs, kp_u32s...) */
    uint16_t has_offset; /* of the bool has_NAME: single, optional, fixed-width fields only */
};

struct kp_msg_desc {
    const char *name;    /* START */
    uint16_t type;       /* KP_MSG_* */
    uint16_t n_fields;
    size_t size;         /* of the struct */
    const struct kp_field_desc *fields; /* in encoding order */
};

/* Decodes a payload into *msg (zeroed first), the fields in any order. A tag the message does not
 * list is skipped; one it lists must have its type's width (str: no NUL byte), a single one may come
 * once, a required one must come. Returns 0, or -1 with *f (stage "protocol"; "request" with ENOMEM)
 * and *msg freed. */
int kp_decode(const struct kp_msg_desc *d, void *msg, const uint8_t *payload, size_t len, struct failure *f);

/* Encodes *msg into buf (the fields in the table's order; a single str field only when non-NULL, a
 * single optional fixed-width one only with has_NAME) and returns the payload's length. What does not
 * fit is clipped as by tlv_put_*: size buf for the message (KP_MAX_PAYLOAD always does for a frame). */
size_t kp_encode(const struct kp_msg_desc *d, const void *msg, uint8_t *buf, size_t cap);

/* Frees what kp_decode allocated and zeroes *msg (a zeroed message is fine too; one whose strings the
 * caller set, e.g. to literals for kp_encode, is not). */
void kp_free(const struct kp_msg_desc *d, void *msg);

#endif
