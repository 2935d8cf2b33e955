#include "http_parse.h"

#include <string.h>
#include <strings.h>

#include "util.h"

#define METHOD_MAX 16

/* What the head says beyond the request itself. */
struct head {
    int minor; /* HTTP/1.minor */
    bool host, length, transfer_encoding;
    uint64_t content_length;
    unsigned fields, fields_max;
};

static const struct {
    int status;
    const char *reason;
} REASONS[] = {
    {200, "OK"},
    {400, "Bad Request"},
    {403, "Forbidden"},
    {404, "Not Found"},
    {405, "Method Not Allowed"},
    {413, "Content Too Large"},
    {415, "Unsupported Media Type"},
    {431, "Request Header Fields Too Large"},
    {501, "Not Implemented"},
    {505, "HTTP Version Not Supported"},
};

const char *http_reason(int status)
{
    for (size_t i = 0; i < ARRAY_LEN(REASONS); i++)
        if (REASONS[i].status == status)
            return REASONS[i].reason;
    return "Error";
}

static bool is_tchar(uint8_t c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static bool all_tchars(const uint8_t *p, const uint8_t *end)
{
    if (p == end)
        return false;
    for (; p < end; p++)
        if (!is_tchar(*p))
            return false;
    return true;
}

static bool name_is(const uint8_t *p, const uint8_t *end, const char *name)
{
    size_t len = strlen(name);
    return (size_t)(end - p) == len && strncasecmp((const char *)p, name, len) == 0;
}

/* Offset just past the empty line that ends the head, 0 if it has not arrived. Bare LF line ends are
 * accepted as RFC 9112 section 2.2 allows. */
static size_t find_head_end(const uint8_t *buf, size_t start, size_t len)
{
    for (size_t i = start; i < len; i++) {
        if (buf[i] != '\n')
            continue;
        if (i + 1 < len && buf[i + 1] == '\n')
            return i + 2;
        if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
            return i + 3;
    }
    return 0;
}

/* [p, end) without its line end. */
static const uint8_t *line_end(const uint8_t *p, const uint8_t *limit, const uint8_t **next)
{
    const uint8_t *nl = memchr(p, '\n', (size_t)(limit - p));
    *next = nl + 1;
    return nl > p && nl[-1] == '\r' ? nl - 1 : nl;
}

static int request_line(const uint8_t *p, const uint8_t *end, struct http_request *rq, struct head *h)
{
    const uint8_t *sp1 = memchr(p, ' ', (size_t)(end - p));
    if (!sp1 || !all_tchars(p, sp1) || sp1 - p > METHOD_MAX)
        return 400;
    const uint8_t *t = sp1 + 1, *sp2 = memchr(t, ' ', (size_t)(end - t));
    if (!sp2 || sp2 == t)
        return 400;
    for (const uint8_t *c = t; c < sp2; c++)
        if (*c < 0x21 || *c == 0x7f)
            return 400;
    const uint8_t *v = sp2 + 1;
    if (end - v != 8 || memcmp(v, "HTTP/", 5) != 0 || v[5] < '0' || v[5] > '9' || v[6] != '.' || v[7] < '0' ||
        v[7] > '9')
        return 400;
    if (v[5] != '1')
        return 505;
    h->minor = v[7] - '0';
    rq->method = p;
    rq->method_len = (size_t)(sp1 - p);
    rq->target = t;
    rq->target_len = (size_t)(sp2 - t);
    return 0;
}

static int content_length(const uint8_t *v, const uint8_t *end, struct head *h)
{
    uint64_t n = 0;
    if (v == end)
        return 400;
    for (const uint8_t *c = v; c < end; c++)
        if (*c < '0' || *c > '9')
            return 400;
    if (end - v > 9)
        return 413; /* far more than a request may carry */
    for (const uint8_t *c = v; c < end; c++)
        n = n * 10 + (uint64_t)(*c - '0');
    if (h->length && n != h->content_length)
        return 400; /* two different lengths: which one would the client mean? */
    h->length = true;
    h->content_length = n;
    return 0;
}

static int header_field(const uint8_t *p, const uint8_t *end, struct http_request *rq, struct head *h)
{
    const uint8_t *colon = memchr(p, ':', (size_t)(end - p));
    if (!colon || !all_tchars(p, colon)) /* also refuses "Name :" and obsolete line folding */
        return 400;
    if (++h->fields > h->fields_max)
        return 431;
    const uint8_t *v = colon + 1, *e = end;
    while (v < e && (*v == ' ' || *v == '\t'))
        v++;
    while (e > v && (e[-1] == ' ' || e[-1] == '\t'))
        e--;
    for (const uint8_t *c = v; c < e; c++)
        if ((*c < 0x20 && *c != '\t') || *c == 0x7f)
            return 400;
    if (name_is(p, colon, "host")) {
        if (h->host)
            return 400;
        h->host = true;
    } else if (name_is(p, colon, "content-length")) {
        return content_length(v, e, h);
    } else if (name_is(p, colon, "transfer-encoding")) {
        h->transfer_encoding = true;
    } else if (name_is(p, colon, "content-type")) {
        rq->ctype = v;
        rq->ctype_len = (size_t)(e - v);
    }
    return 0;
}

static int parse_head(const uint8_t *p, const uint8_t *limit, struct http_request *rq, struct head *h)
{
    const uint8_t *next;
    const uint8_t *end = line_end(p, limit, &next);
    int status = request_line(p, end, rq, h);
    for (p = next; !status; p = next) {
        end = line_end(p, limit, &next);
        if (end == p)
            break; /* the empty line */
        status = header_field(p, end, rq, h);
    }
    return status;
}

int http_parse_request(const uint8_t *buf, size_t len, bool eof, const struct http_limits *lim,
                       struct http_request *rq)
{
    struct head h = {.fields_max = lim->fields_max};
    size_t start = 0;
    while (start < len && (buf[start] == '\r' || buf[start] == '\n'))
        start++; /* RFC 9112 section 2.2: empty lines before the request line are ignored */
    size_t head_end = find_head_end(buf, start, len);
    if (!head_end)
        return len - start > lim->head_max ? 431 : eof ? 400 : HTTP_NEED_MORE;
    if (head_end - start > lim->head_max)
        return 431;
    *rq = (struct http_request){0};
    int status = parse_head(buf + start, buf + head_end, rq, &h);
    if (status)
        return status;
    if (h.transfer_encoding)
        return 501; /* no chunked bodies: a form is small and every client sends Content-Length */
    if (h.minor >= 1 && !h.host)
        return 400; /* RFC 9112 section 3.2 */
    if (head_end > lim->request_max || h.content_length > lim->request_max - head_end)
        return 413;
    if (len - head_end < h.content_length)
        return eof ? 400 : HTTP_NEED_MORE;
    rq->body = buf + head_end;
    rq->body_len = (size_t)h.content_length;
    return HTTP_COMPLETE;
}
