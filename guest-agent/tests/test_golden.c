/* C unit test of the generated message codec (make -C guest-agent test): every golden frame of
 * tests/golden/frames.json (build/golden.h) decodes to its message and that message encodes to the
 * frame's canonical bytes, header included, byte for byte; a frame marked bad fails to decode with
 * the error the JSON says. tests/unit/test_protocol.py checks the same frames against the host's
 * Python codec, so both ends read and write the same bytes. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "golden.h"
#include "messages.h"
#include "protocol.h"
#include "util.h"

#include "check.h"

static const void *at(const void *msg, size_t offset)
{
    return (const uint8_t *)msg + offset;
}

static bool same_value(const struct kp_field_desc *fd, const void *a, const void *b)
{
    if (fd->type == KP_T_STR) {
        const char *x, *y;
        memcpy(&x, a, sizeof x);
        memcpy(&y, b, sizeof y);
        return (!x && !y) || (x && y && strcmp(x, y) == 0);
    }
    return memcmp(a, b, fd->type == KP_T_U64 ? 8 : 4) == 0;
}

/* Compares two messages field by field, through the message's table; names the first difference. */
static const char *difference(const struct kp_msg_desc *d, const void *got, const void *want)
{
    for (size_t i = 0; i < d->n_fields; i++) {
        const struct kp_field_desc *fd = &d->fields[i];
        if (fd->flags & KP_FIELD_REPEATED) {
            const struct kp_strs *x = at(got, fd->offset), *y = at(want, fd->offset); /* one layout for all lists */
            if (x->n != y->n)
                return fd->name;
            size_t size = fd->type == KP_T_STR ? sizeof(char *) : fd->type == KP_T_U64 ? 8 : 4;
            for (size_t j = 0; j < x->n; j++)
                if (!same_value(fd, (const uint8_t *)x->v + j * size, (const uint8_t *)y->v + j * size))
                    return fd->name;
            if (fd->type == KP_T_STR && x->n && x->v[x->n]) /* str lists end with NULL */
                return fd->name;
            continue;
        }
        if (fd->type != KP_T_STR && !(fd->flags & KP_FIELD_REQUIRED)) {
            bool has_x = *(const bool *)at(got, fd->has_offset), has_y = *(const bool *)at(want, fd->has_offset);
            if (has_x != has_y)
                return fd->name;
            if (!has_x)
                continue;
        }
        if (!same_value(fd, at(got, fd->offset), at(want, fd->offset)))
            return fd->name;
    }
    return NULL;
}

static void check_frame(const struct golden_frame *g)
{
    CHECK(g->frame_len >= KP_HEADER_SIZE, "%s: a header", g->name);
    const uint8_t *h = g->frame;
    uint32_t len = le_get(h, 4), stream = le_get(h + 8, 4);
    CHECK(len == g->frame_len - KP_HEADER_SIZE && le_get(h + 4, 2) == g->desc->type && le_get(h + 6, 2) == 0,
          "%s: header (length %u, type %u)", g->name, len, le_get(h + 4, 2));

    uint8_t *msg = malloc(g->desc->size);
    struct failure f = {.stage = "", .msg = ""};
    int rc = kp_decode(g->desc, msg, h + KP_HEADER_SIZE, len, &f);
    if (g->error) {
        CHECK(rc < 0 && strcmp(f.stage, "protocol") == 0 && strstr(f.msg, g->error), "%s: want error \"%s\", got %d %s: %s",
              g->name, g->error, rc, f.stage, f.msg);
        free(msg);
        return;
    }
    CHECK(rc == 0, "%s: decoding failed: %s: %s", g->name, f.stage, f.msg);
    if (rc < 0) {
        free(msg);
        return;
    }
    const char *diff = difference(g->desc, msg, g->message);
    CHECK(!diff, "%s: %s decodes to another value", g->name, diff ? diff : "");

    /* Both the decoded message and the JSON's encode to the canonical frame. */
    const void *sources[] = {msg, g->message};
    for (size_t s = 0; s < ARRAY_LEN(sources); s++) {
        uint8_t frame[KP_HEADER_SIZE + KP_MAX_PAYLOAD];
        size_t n = kp_encode(g->desc, sources[s], frame + KP_HEADER_SIZE, KP_MAX_PAYLOAD);
        le_put(frame, n, 4);
        le_put(frame + 4, g->desc->type, 2);
        le_put(frame + 6, 0, 2);
        le_put(frame + 8, stream, 4);
        CHECK(KP_HEADER_SIZE + n == g->encoded_len && memcmp(frame, g->encoded, g->encoded_len) == 0,
              "%s: the %s message encodes to other bytes (%zu, want %zu)", g->name, s ? "expected" : "decoded",
              KP_HEADER_SIZE + n, g->encoded_len);
    }
    kp_free(g->desc, msg);
    size_t zero = 0;
    while (zero < g->desc->size && msg[zero] == 0)
        zero++;
    CHECK(zero == g->desc->size, "%s: kp_free zeroes the message", g->name);
    free(msg);
}

/* kp_encode clips what does not fit, as tlv_put_* do: a field whole or not at all (fixed width),
 * cut short (str). */
static void test_clipping(void)
{
    uint8_t buf[16];
    struct kp_error e = {.stage = "exec", .has_errno_ = true, .errno_ = 2, .message = "a long message"};
    size_t n = kp_error_encode(&e, buf, sizeof buf);
    CHECK(n == sizeof buf, "filled: %zu", n);
    CHECK(memcmp(buf + 6, "exec", 4) == 0 && le_get(buf + 10, 2) == KP_F_MESSAGE && le_get(buf + 12, 4) == 0,
          "STAGE whole, ERRNO (10 bytes) dropped, MESSAGE cut to nothing");
}

int main(void)
{
    for (size_t i = 0; i < ARRAY_LEN(GOLDEN); i++)
        check_frame(&GOLDEN[i]);
    test_clipping();
    printf("golden: %zu frames, %d checks, %d failed\n", ARRAY_LEN(GOLDEN), checks, failures);
    return failures ? 1 : 0;
}
