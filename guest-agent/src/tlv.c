#include "tlv.h"

#include <errno.h>
#include <stddef.h>
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

/* The next field, whatever its tag: 1, 0 at the end, -1 when truncated. */
static int next_field(struct tlv_reader *r, struct tlv_field *field, struct failure *f)
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
    return 1;
}

int tlv_next(struct tlv_reader *r, struct tlv_field *field, struct failure *f)
{
    int rc = next_field(r, field, f);
    if (rc <= 0)
        return rc;
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

/* --- messages --- */

/* Width of a value of a fixed-width type (0: str, any length). */
static const uint8_t WIDTH[] = {[KP_T_U32] = 4, [KP_T_I32] = 4, [KP_T_U64] = 8, [KP_T_STR] = 0};

/* Every list struct (kp_strs, kp_u32s...) is {pointer, size_t}; the generic code reads and writes
 * them through memcpy at the field's offset. */
_Static_assert(offsetof(struct kp_strs, n) == offsetof(struct kp_u32s, n) &&
                   offsetof(struct kp_strs, n) == offsetof(struct kp_u64s, n) &&
                   offsetof(struct kp_strs, n) == offsetof(struct kp_i32s, n),
               "the lists share one layout");

static void *list_get(const void *msg, const struct kp_field_desc *fd, size_t *n)
{
    void *v;
    memcpy(&v, (const uint8_t *)msg + fd->offset, sizeof v);
    memcpy(n, (const uint8_t *)msg + fd->offset + offsetof(struct kp_strs, n), sizeof *n);
    return v;
}

static void list_set(void *msg, const struct kp_field_desc *fd, void *v, size_t n)
{
    memcpy((uint8_t *)msg + fd->offset, &v, sizeof v);
    memcpy((uint8_t *)msg + fd->offset + offsetof(struct kp_strs, n), &n, sizeof n);
}

static size_t element_size(const struct kp_field_desc *fd)
{
    return fd->type == KP_T_STR ? sizeof(char *) : WIDTH[fd->type];
}

static const struct kp_field_desc *field_of(const struct kp_msg_desc *d, uint16_t tag)
{
    for (size_t i = 0; i < d->n_fields; i++)
        if (d->fields[i].tag == tag)
            return &d->fields[i];
    return NULL;
}

/* Stores one value at `dst` (a list element or the single field's place): str as a malloc'ed copy. */
static int store_value(const struct kp_field_desc *fd, const struct tlv_field *fl, void *dst, struct failure *f)
{
    if (fd->type != KP_T_STR) {
        uint64_t v = fd->type == KP_T_U64 ? tlv_u64(fl) : tlv_u32(fl);
        if (fd->type == KP_T_U64)
            memcpy(dst, &v, 8);
        else {
            uint32_t v32 = (uint32_t)v;
            memcpy(dst, &v32, 4); /* an i32 is its two's complement u32 */
        }
        return 0;
    }
    char *s = tlv_strdup(fl, f);
    if (!s)
        return -1;
    memcpy(dst, &s, sizeof s);
    return 0;
}

int kp_decode(const struct kp_msg_desc *d, void *msg, const uint8_t *payload, size_t len, struct failure *f)
{
    size_t count[KP_MAX_MSG_FIELDS] = {0};
    struct tlv_reader rd;
    struct tlv_field fl;
    int more;
    memset(msg, 0, d->size);
    if (d->n_fields > KP_MAX_MSG_FIELDS)
        return failf(f, "protocol", 0, "%s has more fields than KP_MAX_MSG_FIELDS", d->name);

    /* First pass: check every field of the message and count them, so each list is allocated once. */
    tlv_reader_init(&rd, payload, len);
    while ((more = next_field(&rd, &fl, f)) > 0) {
        const struct kp_field_desc *fd = field_of(d, fl.tag);
        if (!fd)
            continue; /* not one of this message's fields: skipped, as the protocol says */
        size_t i = (size_t)(fd - d->fields);
        if (fd->type != KP_T_STR && fl.len != WIDTH[fd->type])
            return failf(f, "protocol", 0, "%s: %s has %u bytes, expected %u", d->name, fd->name, fl.len,
                         WIDTH[fd->type]);
        if (fd->type == KP_T_STR && memchr(fl.value, '\0', fl.len))
            return failf(f, "protocol", 0, "%s: %s contains a NUL byte", d->name, fd->name);
        if (count[i]++ && !(fd->flags & KP_FIELD_REPEATED))
            return failf(f, "protocol", 0, "%s carries %s twice", d->name, fd->name);
    }
    if (more < 0)
        return -1;
    for (size_t i = 0; i < d->n_fields; i++)
        if ((d->fields[i].flags & KP_FIELD_REQUIRED) && !count[i])
            return failf(f, "protocol", 0, "%s lacks %s", d->name, d->fields[i].name);

    /* The lists, then the values. */
    for (size_t i = 0; i < d->n_fields; i++) {
        const struct kp_field_desc *fd = &d->fields[i];
        if (!(fd->flags & KP_FIELD_REPEATED) || !count[i])
            continue;
        void *v = calloc(count[i] + (fd->type == KP_T_STR), element_size(fd)); /* str: the closing NULL */
        if (!v) {
            kp_free(d, msg);
            return failf(f, "request", ENOMEM, "out of memory");
        }
        list_set(msg, fd, v, 0);
    }
    tlv_reader_init(&rd, payload, len);
    while (next_field(&rd, &fl, f) > 0) {
        const struct kp_field_desc *fd = field_of(d, fl.tag);
        if (!fd)
            continue;
        uint8_t *dst = (uint8_t *)msg + fd->offset;
        if (fd->flags & KP_FIELD_REPEATED) {
            size_t n;
            uint8_t *v = list_get(msg, fd, &n);
            dst = v + n * element_size(fd);
            list_set(msg, fd, v, n + 1);
        } else if (fd->type != KP_T_STR && !(fd->flags & KP_FIELD_REQUIRED)) {
            *(bool *)((uint8_t *)msg + fd->has_offset) = true;
        }
        if (store_value(fd, &fl, dst, f) < 0) {
            kp_free(d, msg);
            return -1;
        }
    }
    return 0;
}

static void put_value(struct tlv_writer *w, const struct kp_field_desc *fd, const uint8_t *src)
{
    switch (fd->type) {
    case KP_T_U32:
    case KP_T_I32: {
        uint32_t v;
        memcpy(&v, src, 4);
        tlv_put_u32(w, fd->tag, v);
        break;
    }
    case KP_T_U64: {
        uint64_t v;
        memcpy(&v, src, 8);
        tlv_put_u64(w, fd->tag, v);
        break;
    }
    default: {
        const char *s;
        memcpy(&s, src, sizeof s);
        if (s)
            tlv_put_str(w, fd->tag, s);
    }
    }
}

size_t kp_encode(const struct kp_msg_desc *d, const void *msg, uint8_t *buf, size_t cap)
{
    struct tlv_writer w = {.buf = buf, .cap = cap, .len = 0};
    for (size_t i = 0; i < d->n_fields; i++) {
        const struct kp_field_desc *fd = &d->fields[i];
        const uint8_t *src = (const uint8_t *)msg + fd->offset;
        if (fd->flags & KP_FIELD_REPEATED) {
            size_t n;
            const uint8_t *v = list_get(msg, fd, &n);
            for (size_t j = 0; j < n; j++)
                put_value(&w, fd, v + j * element_size(fd));
        } else if (fd->type == KP_T_STR || (fd->flags & KP_FIELD_REQUIRED) ||
                   *(const bool *)((const uint8_t *)msg + fd->has_offset)) {
            put_value(&w, fd, src);
        }
    }
    return w.len;
}

void kp_free(const struct kp_msg_desc *d, void *msg)
{
    for (size_t i = 0; i < d->n_fields; i++) {
        const struct kp_field_desc *fd = &d->fields[i];
        if (fd->type != KP_T_STR && !(fd->flags & KP_FIELD_REPEATED))
            continue;
        if (!(fd->flags & KP_FIELD_REPEATED)) {
            char *s;
            memcpy(&s, (uint8_t *)msg + fd->offset, sizeof s);
            free(s);
            continue;
        }
        size_t n;
        void *v = list_get(msg, fd, &n);
        if (fd->type == KP_T_STR)
            for (size_t j = 0; j < n; j++)
                free(((char **)v)[j]);
        free(v);
    }
    memset(msg, 0, d->size);
}
