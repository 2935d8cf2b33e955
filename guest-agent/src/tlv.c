#include "tlv.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "protocol.h"

#define TLV_HEADER 6u

/* Width of a known fixed-size field, 0 for str and unknown tags (any length is fine there). */
static uint32_t fixed_width(uint16_t tag)
{
    static const uint8_t width_of_type[] = {[KP_T_U32] = 4, [KP_T_I32] = 4, [KP_T_U64] = 8, [KP_T_STR] = 0};
    switch (tag) {
#define FIELD_WIDTH(name, type) \
    case KP_F_##name:           \
        return width_of_type[type];
        KP_FIELDS(FIELD_WIDTH)
#undef FIELD_WIDTH
    default:
        return 0;
    }
}

void tlv_reader_init(struct tlv_reader *r, const void *payload, size_t len)
{
    r->pos = payload;
    r->end = r->pos + len;
}

int tlv_next(struct tlv_reader *r, struct tlv_field *field, struct failure *f)
{
    size_t left = (size_t)(r->end - r->pos);
    if (left == 0)
        return 0;
    if (left < TLV_HEADER)
        return failf(f, "protocol", 0, "truncated field header");
    field->tag = (uint16_t)le_get(r->pos, 2);
    field->len = le_get(r->pos + 2, 4);
    left -= TLV_HEADER;
    if (field->len > left)
        return failf(f, "protocol", 0, "field %u claims %u bytes, only %zu remain", field->tag, field->len, left);
    field->value = r->pos + TLV_HEADER;
    r->pos = field->value + field->len;
    uint32_t width = fixed_width(field->tag);
    if (width && field->len != width)
        return failf(f, "protocol", 0, "field %u has %u bytes, expected %u", field->tag, field->len, width);
    return 1;
}

uint32_t tlv_u32(const struct tlv_field *field)
{
    return le_get(field->value, 4);
}

uint64_t tlv_u64(const struct tlv_field *field)
{
    return (uint64_t)le_get(field->value + 4, 4) << 32 | le_get(field->value, 4);
}

char *tlv_strdup(const struct tlv_field *field, struct failure *f)
{
    if (memchr(field->value, '\0', field->len)) {
        failf(f, "protocol", 0, "field %u contains a NUL byte", field->tag);
        return NULL;
    }
    char *s = malloc((size_t)field->len + 1);
    if (!s) {
        failf(f, "request", ENOMEM, "out of memory");
        return NULL;
    }
    memcpy(s, field->value, field->len);
    s[field->len] = '\0';
    return s;
}

/* Reserves a field of `len` value bytes; NULL when it does not fit. */
static uint8_t *put_header(struct tlv_writer *w, uint16_t tag, size_t len)
{
    if (w->cap - w->len < TLV_HEADER + len)
        return NULL;
    uint8_t *p = w->buf + w->len;
    le_put(p, tag, 2);
    le_put(p + 2, len, 4);
    w->len += TLV_HEADER + len;
    return p + TLV_HEADER;
}

static void put_fixed(struct tlv_writer *w, uint16_t tag, uint64_t v, unsigned width)
{
    uint8_t *p = put_header(w, tag, width);
    if (p)
        le_put(p, v, width);
}

void tlv_put_u32(struct tlv_writer *w, uint16_t tag, uint32_t v)
{
    put_fixed(w, tag, v, 4);
}

void tlv_put_i32(struct tlv_writer *w, uint16_t tag, int32_t v)
{
    put_fixed(w, tag, (uint32_t)v, 4);
}

void tlv_put_u64(struct tlv_writer *w, uint16_t tag, uint64_t v)
{
    put_fixed(w, tag, v, 8);
}

void tlv_put_str(struct tlv_writer *w, uint16_t tag, const char *s)
{
    size_t len = strlen(s);
    size_t room = w->cap - w->len;
    if (room < TLV_HEADER)
        return;
    if (len > room - TLV_HEADER)
        len = room - TLV_HEADER;
    memcpy(put_header(w, tag, len), s, len);
}
