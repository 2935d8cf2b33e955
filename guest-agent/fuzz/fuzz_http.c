/* libFuzzer harness: the metadata service's HTTP request parser (src/http_parse.c), which takes what any
 * app in the pod sends to PID 1's metadata service. Input: one byte of options (eof; small or default
 * limits), then the request bytes, copied to a buffer of exactly their size so that AddressSanitizer
 * catches a read past them.
 *
 * Checked beyond what the sanitizers catch: the status is NEED_MORE, COMPLETE or an error status the
 * service answers with; a complete request's parts lie inside the input; NEED_MORE never comes at eof;
 * a request complete before eof is the same request at eof; parsing twice gives the same answer.
 * make -C guest-agent fuzz; docs/reliability.md. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "http_parse.h"

#define CHECK(cond)      \
    do {                 \
        if (!(cond))     \
            abort();     \
    } while (0)

static const struct http_limits DEFAULT_LIMITS = {.head_max = 8192, .request_max = 65536, .fields_max = 64};
static const struct http_limits SMALL_LIMITS = {.head_max = 64, .request_max = 128, .fields_max = 3};

static void inside(const uint8_t *buf, size_t len, const uint8_t *p, size_t n)
{
    CHECK(n == 0 || (p >= buf && p + n <= buf + len));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    bool eof = data[0] & 1;
    const struct http_limits *lim = data[0] & 2 ? &SMALL_LIMITS : &DEFAULT_LIMITS;
    size_t len = size - 1;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf)
        return 0;
    memcpy(buf, data + 1, len);

    struct http_request rq, rq2;
    int status = http_parse_request(buf, len, eof, lim, &rq);
    CHECK(status == HTTP_NEED_MORE || status == HTTP_COMPLETE || status == 400 || status == 413 ||
          status == 431 || status == 501 || status == 505);
    CHECK(!(eof && status == HTTP_NEED_MORE));
    CHECK(http_parse_request(buf, len, eof, lim, &rq2) == status);
    if (status == HTTP_COMPLETE) {
        inside(buf, len, rq.method, rq.method_len);
        inside(buf, len, rq.target, rq.target_len);
        inside(buf, len, rq.body, rq.body_len);
        if (rq.ctype)
            inside(buf, len, rq.ctype, rq.ctype_len);
        CHECK(rq.method_len > 0 && rq.target_len > 0);
        if (!eof) {
            CHECK(http_parse_request(buf, len, true, lim, &rq2) == HTTP_COMPLETE);
            CHECK(rq2.method == rq.method && rq2.target == rq.target && rq2.body == rq.body &&
                  rq2.body_len == rq.body_len && rq2.ctype == rq.ctype);
        }
    }
    CHECK(strlen(http_reason(status)) > 0);
    free(buf);
    return 0;
}
