#include "frame.h"

#include <string.h>

#include "protocol.h"

struct msg_spec {
    uint16_t id;
    const char *name;
    enum kp_from from;
    enum kp_stream_kind stream;
    enum kp_payload_kind payload;
};

static const struct msg_spec SPECS[] = {
#define SPEC(name, from, stream, payload) {KP_MSG_##name, #name, from, stream, payload},
    KP_MESSAGES(SPEC)
#undef SPEC
};

static const struct msg_spec *spec_of(uint16_t type)
{
    for (size_t i = 0; i < ARRAY_LEN(SPECS); i++)
        if (SPECS[i].id == type)
            return &SPECS[i];
    return NULL;
}

const char *message_name(uint16_t type)
{
    const struct msg_spec *s = spec_of(type);
    return s ? s->name : "?";
}

uint8_t *frame_reader_space(struct frame_reader *r, size_t *room)
{
    if (r->start) {
        memmove(r->buf, r->buf + r->start, r->end - r->start);
        r->end -= r->start;
        r->start = 0;
    }
    *room = r->cap - r->end;
    return r->buf + r->end;
}

void frame_reader_filled(struct frame_reader *r, size_t n)
{
    r->end += n;
}

static int check_header(uint32_t len, uint16_t type, uint16_t flags, uint32_t stream, struct failure *f)
{
    if (len > KP_MAX_PAYLOAD)
        return failf(f, "protocol", 0, "frame payload of %u bytes exceeds the %u-byte limit", len, KP_MAX_PAYLOAD);
    const struct msg_spec *s = spec_of(type);
    if (!s)
        return failf(f, "protocol", 0, "unknown message type %u", type);
    if (flags)
        return failf(f, "protocol", 0, "%s frame has reserved flags 0x%x set", s->name, flags);
    if (s->from != KP_FROM_HOST)
        return failf(f, "protocol", 0, "host sent %s, a guest-to-host message", s->name);
    if ((s->stream == KP_STREAM_ZERO && stream != 0) || (s->stream == KP_STREAM_PROCESS && stream == 0))
        return failf(f, "protocol", 0, "%s frame on stream %u, which it may not use", s->name, stream);
    if (s->payload == KP_PAYLOAD_EMPTY && len)
        return failf(f, "protocol", 0, "%s frame carries a payload", s->name);
    return 0;
}

int frame_reader_next(struct frame_reader *r, struct frame *fr, struct failure *f)
{
    size_t avail = r->end - r->start;
    if (avail < KP_HEADER_SIZE)
        return 0;
    const uint8_t *h = r->buf + r->start;
    uint32_t len = le_get(h, 4);
    uint16_t type = (uint16_t)le_get(h + 4, 2);
    uint32_t stream = le_get(h + 8, 4);
    if (check_header(len, type, (uint16_t)le_get(h + 6, 2), stream, f) < 0)
        return -1;
    if (avail - KP_HEADER_SIZE < len)
        return 0;
    *fr = (struct frame){.type = type, .stream = stream, .payload = h + KP_HEADER_SIZE, .len = len};
    r->start += KP_HEADER_SIZE + len;
    return 1;
}
