/* HTTP/1.1 requests (RFC 9112) as the metadata service takes them: a head, then Content-Length bytes of
 * body. A pure function over the bytes received so far, without sockets or state, so that it can be
 * tested and fuzzed on its own. */
#ifndef KVMPOD_HTTP_PARSE_H
#define KVMPOD_HTTP_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct http_limits {
    size_t head_max;     /* the request line and header fields, with their line ends */
    size_t request_max;  /* the head and the body together */
    unsigned fields_max; /* header fields */
};

/* Points into the parsed buffer; ctype is NULL without a Content-Type field. */
struct http_request {
    const uint8_t *method, *target, *ctype, *body;
    size_t method_len, target_len, ctype_len, body_len;
};

enum { HTTP_NEED_MORE = 0, HTTP_COMPLETE = 1 }; /* or an error status, >= 400 */

/* Looks at the `len` bytes of a request received so far (eof: the client sends no more). Returns
 * HTTP_NEED_MORE, HTTP_COMPLETE with *rq filled, or the status of the error to answer: 400 (malformed,
 * or cut short at eof), 413 (a body beyond request_max), 431 (a head beyond head_max or fields_max),
 * 501 (Transfer-Encoding), 505 (not HTTP/1.x). Reads only buf[0, len). */
int http_parse_request(const uint8_t *buf, size_t len, bool eof, const struct http_limits *lim,
                       struct http_request *rq);

/* The reason phrase of a status the service answers with ("Error" for others). */
const char *http_reason(int status);

#endif
