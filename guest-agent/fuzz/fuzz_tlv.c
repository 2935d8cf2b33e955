/* libFuzzer harness: the agent's TLV decoder (src/tlv.c's kp_decode over the generated tables of
 * build/messages.c), which takes every host -> guest payload. Input: one byte choosing the message
 * (modulo the number of tlv messages), then the payload.
 *
 * Checked beyond what the sanitizers catch: a payload decodes or fails with stage "protocol" (or
 * "request" for ENOMEM) and a one-line message; what decodes re-encodes to a payload that decodes again
 * and re-encodes to the same bytes (the canonical form); the field iterator (tlv_next) agrees with the
 * decoder about where a payload is truncated. make -C guest-agent fuzz builds it; docs/reliability.md. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "messages.h"
#include "protocol.h"
#include "tlv.h"

#define CHECK(cond)      \
    do {                 \
        if (!(cond))     \
            abort();     \
    } while (0)

static uint8_t first[KP_MAX_PAYLOAD], second[KP_MAX_PAYLOAD];
static _Alignas(max_align_t) uint8_t msg[4096], again[4096];

static void check_failure(const struct failure *f)
{
    CHECK(strcmp(f->stage, "protocol") == 0 || strcmp(f->stage, "request") == 0);
    CHECK(f->msg[0] && !strchr(f->msg, '\n'));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size - 1 > KP_MAX_PAYLOAD)
        return 0;
    const struct kp_msg_desc *d = kp_msg_descs[data[0] % KP_N_MSG_DESCS];
    const uint8_t *payload = data + 1;
    size_t len = size - 1;
    CHECK(d->size <= sizeof msg);

    /* the raw fields: truncation is found where the decoder finds it */
    struct tlv_reader rd;
    struct tlv_field fl;
    struct failure f;
    int rc;
    bool truncated = false;
    tlv_reader_init(&rd, payload, len);
    while ((rc = tlv_next(&rd, &fl, &f)) > 0)
        CHECK(fl.value >= payload && fl.value + fl.len <= payload + len);
    if (rc < 0) {
        check_failure(&f);
        truncated = strstr(f.msg, "truncated") || strstr(f.msg, "claims");
    }

    if (kp_decode(d, msg, payload, len, &f) < 0) {
        check_failure(&f);
        return 0;
    }
    CHECK(!truncated);
    size_t n1 = kp_encode(d, msg, first, sizeof first);
    CHECK(n1 <= len); /* the canonical form drops what is unknown, never adds */
    kp_free(d, msg);
    CHECK(kp_decode(d, again, first, n1, &f) == 0);
    size_t n2 = kp_encode(d, again, second, sizeof second);
    CHECK(n1 == n2 && memcmp(first, second, n1) == 0);
    kp_free(d, again);
    return 0;
}
