#include "metadata.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "log.h"
#include "protocol.h"
#include "sha512.h"
#include "tlv.h"
#include "util.h"

#define API_PREFIX "/acMetadata/v1"
#define JSON "application/json"
#define TEXT "text/plain; charset=us-ascii"
#define TOKEN_MIN 16
#define TOKEN_MAX 128
#define KEY_MIN 64
#define KEY_MAX 128
#define APP_NAME_MAX 255
#define MAX_APPS KP_MAX_STREAMS   /* every app runs on a stream of its own */
#define MAX_HEADER_FIELDS 64
#define METHOD_MAX 16
#define UUID_TEXT_LEN 36
#define SIGNATURE_TEXT_MAX 512    /* a base64 HMAC-SHA512 is 88 characters */
#define IDLE_MS 10000u            /* a connection without progress for this long is closed */
#define LINGER_MS 1000u           /* after the answer: how long the client's unread bytes are drained */
#define DRAIN_ROUNDS 16

/* ============================================================================================
 * The store: the documents the host pushed, final once METADATA_START has come.
 * ============================================================================================ */

struct doc {
    uint8_t *data;
    size_t len;
    bool present;
};

enum { POD_MANIFEST, POD_ANNOTATIONS, POD_DOCS };
enum { APP_IMAGE_ID, APP_IMAGE_MANIFEST, APP_ANNOTATIONS, APP_DOCS };

struct md_app {
    char name[APP_NAME_MAX + 1];
    struct doc docs[APP_DOCS];
};

static struct {
    bool started;
    uint8_t uuid[16];
    char uuid_text[UUID_TEXT_LEN + 1];
    char token[TOKEN_MAX + 1];
    size_t token_len;
    uint8_t key[KEY_MAX];
    size_t key_len;
    uint16_t port;
    struct doc pod[POD_DOCS];
    struct md_app apps[MAX_APPS];
    size_t n_apps;
} md;

static const char *const POD_DOC_NAMES[POD_DOCS] = {"POD_MANIFEST", "POD_ANNOTATIONS"};
static const char *const APP_DOC_NAMES[APP_DOCS] = {"IMAGE_ID", "IMAGE_MANIFEST", "APP_ANNOTATIONS"};

static int pod_doc_index(uint16_t tag)
{
    return tag == KP_F_POD_MANIFEST ? POD_MANIFEST : tag == KP_F_POD_ANNOTATIONS ? POD_ANNOTATIONS : -1;
}

static int app_doc_index(uint16_t tag)
{
    switch (tag) {
    case KP_F_IMAGE_ID:
        return APP_IMAGE_ID;
    case KP_F_IMAGE_MANIFEST:
        return APP_IMAGE_MANIFEST;
    case KP_F_APP_ANNOTATIONS:
        return APP_ANNOTATIONS;
    default:
        return -1;
    }
}

static int doc_append(struct doc *d, const struct tlv_field *fl, struct failure *err)
{
    if (fl->len > METADATA_DOC_MAX - d->len)
        return failf(err, "protocol", 0, "a metadata document exceeds %u bytes", METADATA_DOC_MAX);
    if (fl->len) {
        uint8_t *grown = realloc(d->data, d->len + fl->len);
        if (!grown)
            return failf(err, "metadata", ENOMEM, "out of memory for the metadata documents");
        memcpy(grown + d->len, fl->value, fl->len);
        d->data = grown;
        d->len += fl->len;
    }
    d->present = true;
    return 0;
}

/* An app name is one path segment of printable ASCII (AC Names are [a-z0-9-]). */
static bool valid_app_name(const uint8_t *s, size_t len)
{
    if (len == 0 || len > APP_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (s[i] <= ' ' || s[i] >= 0x7f || s[i] == '/')
            return false;
    return true;
}

static struct md_app *find_app(const char *name, size_t len)
{
    for (size_t i = 0; i < md.n_apps; i++)
        if (strlen(md.apps[i].name) == len && memcmp(md.apps[i].name, name, len) == 0)
            return &md.apps[i];
    return NULL;
}

static struct md_app *app_named(const struct tlv_field *fl, struct failure *err)
{
    if (!valid_app_name(fl->value, fl->len)) {
        failf(err, "protocol", 0, "METADATA: APP_NAME is not a valid app name");
        return NULL;
    }
    struct md_app *a = find_app((const char *)fl->value, fl->len);
    if (a)
        return a;
    if (md.n_apps == MAX_APPS) {
        failf(err, "protocol", 0, "METADATA: more than %u apps", MAX_APPS);
        return NULL;
    }
    a = &md.apps[md.n_apps++];
    memcpy(a->name, fl->value, fl->len);
    a->name[fl->len] = '\0';
    return a;
}

/* METADATA: pod documents first, then (optionally) APP_NAME and that app's documents. */
static int load_documents(const struct frame *f, struct failure *err)
{
    struct tlv_reader rd;
    struct tlv_field fl;
    struct md_app *app = NULL;
    int more, i;
    tlv_reader_init(&rd, f->payload, f->len);
    while ((more = tlv_next(&rd, &fl, err)) > 0) {
        if (fl.tag == KP_F_APP_NAME) {
            if (app)
                return failf(err, "protocol", 0, "METADATA names two apps");
            if (!(app = app_named(&fl, err)))
                return -1;
        } else if ((i = pod_doc_index(fl.tag)) >= 0) {
            if (app)
                return failf(err, "protocol", 0, "METADATA: %s after APP_NAME", POD_DOC_NAMES[i]);
            if (doc_append(&md.pod[i], &fl, err) < 0)
                return -1;
        } else if ((i = app_doc_index(fl.tag)) >= 0) {
            if (!app)
                return failf(err, "protocol", 0, "METADATA: %s without APP_NAME", APP_DOC_NAMES[i]);
            if (doc_append(&app->docs[i], &fl, err) < 0)
                return -1;
        }
    }
    return more;
}

static int hex_value(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Canonical UUID text (8-4-4-4-12 hex digits, either case) to its 16 bytes. */
static int parse_uuid(const uint8_t *s, size_t len, uint8_t out[16])
{
    if (len != UUID_TEXT_LEN)
        return -1;
    for (size_t i = 0, n = 0; i < len; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return -1;
            continue;
        }
        int hi = hex_value(s[i]), lo = i + 1 < len ? hex_value(s[i + 1]) : -1;
        if (hi < 0 || lo < 0)
            return -1;
        out[n++] = (uint8_t)(hi << 4 | lo);
        i++;
    }
    return 0;
}

static int load_token(const struct tlv_field *fl, struct failure *err)
{
    if (fl->len < TOKEN_MIN || fl->len > TOKEN_MAX)
        return failf(err, "protocol", 0, "METADATA_TOKEN must have %u to %u characters", TOKEN_MIN, TOKEN_MAX);
    for (size_t i = 0; i < fl->len; i++) {
        uint8_t c = fl->value[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
            return failf(err, "protocol", 0, "METADATA_TOKEN has a character outside [A-Za-z0-9_-]");
    }
    memcpy(md.token, fl->value, fl->len);
    md.token_len = fl->len;
    return 0;
}

static int load_key(const struct tlv_field *fl, struct failure *err)
{
    if (fl->len % 2 || fl->len / 2 < KEY_MIN || fl->len / 2 > KEY_MAX)
        return failf(err, "protocol", 0, "HMAC_KEY must be %u to %u bytes in hex", KEY_MIN, KEY_MAX);
    for (size_t i = 0; i < fl->len; i += 2) {
        int hi = hex_value(fl->value[i]), lo = hex_value(fl->value[i + 1]);
        if (hi < 0 || lo < 0)
            return failf(err, "protocol", 0, "HMAC_KEY is not hex");
        md.key[i / 2] = (uint8_t)(hi << 4 | lo);
    }
    md.key_len = fl->len / 2;
    return 0;
}

static int load_field(const struct tlv_field *fl, unsigned *have, struct failure *err)
{
    switch (fl->tag) {
    case KP_F_POD_UUID:
        if (parse_uuid(fl->value, fl->len, md.uuid) < 0)
            return failf(err, "protocol", 0, "POD_UUID is not a UUID");
        *have |= 1;
        return 0;
    case KP_F_METADATA_TOKEN:
        *have |= 2;
        return load_token(fl, err);
    case KP_F_HMAC_KEY:
        *have |= 4;
        return load_key(fl, err);
    case KP_F_METADATA_PORT:
        md.port = (uint16_t)tlv_u32(fl);
        if (md.port == 0 || tlv_u32(fl) > 65535)
            return failf(err, "protocol", 0, "METADATA_PORT %u is not a TCP port", tlv_u32(fl));
        *have |= 8;
        return 0;
    default:
        return 0;
    }
}

/* Every document the service serves must be there: the host sends them all before METADATA_START. */
static int check_complete(struct failure *err)
{
    for (int i = 0; i < POD_DOCS; i++)
        if (!md.pod[i].present)
            return failf(err, "protocol", 0, "METADATA_START before %s", POD_DOC_NAMES[i]);
    for (size_t a = 0; a < md.n_apps; a++)
        for (int i = 0; i < APP_DOCS; i++)
            if (!md.apps[a].docs[i].present)
                return failf(err, "protocol", 0, "METADATA_START before %s of app %s", APP_DOC_NAMES[i],
                             md.apps[a].name);
    return 0;
}

static int load_start(const struct frame *f, struct failure *err)
{
    static const char *const NEEDED[] = {"POD_UUID", "METADATA_TOKEN", "HMAC_KEY", "METADATA_PORT"};
    struct tlv_reader rd;
    struct tlv_field fl;
    unsigned have = 0;
    int more;
    tlv_reader_init(&rd, f->payload, f->len);
    while ((more = tlv_next(&rd, &fl, err)) > 0)
        if (load_field(&fl, &have, err) < 0)
            return -1;
    if (more < 0)
        return -1;
    for (unsigned i = 0; i < ARRAY_LEN(NEEDED); i++)
        if (!(have & 1u << i))
            return failf(err, "protocol", 0, "METADATA_START lacks %s", NEEDED[i]);
    if (check_complete(err) < 0)
        return -1;
    /* Served in canonical (lower-case) form, whatever the case it came in. */
    static const char HEX[] = "0123456789abcdef";
    for (size_t i = 0, n = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            md.uuid_text[n++] = '-';
        md.uuid_text[n++] = HEX[md.uuid[i] >> 4];
        md.uuid_text[n++] = HEX[md.uuid[i] & 15];
    }
    md.started = true;
    return 0;
}

int metadata_load(const struct frame *f, struct failure *err)
{
    if (md.started)
        return failf(err, "protocol", 0, "%s after METADATA_START", message_name(f->type));
    if (f->type == KP_MSG_METADATA)
        return load_documents(f, err);
    if (f->type == KP_MSG_METADATA_START)
        return load_start(f, err);
    return failf(err, "protocol", 0, "%s is not a metadata message", message_name(f->type));
}

/* ============================================================================================
 * Encodings: %-escapes, forms, base64.
 * ============================================================================================ */

/* %XX escapes, and '+' as a space in forms. Returns 0, -1 for a bad escape, -2 when out is too small. */
static int url_decode(const uint8_t *in, size_t len, bool plus, uint8_t *out, size_t cap, size_t *out_len)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t c = in[i];
        if (c == '%') {
            int hi = len - i > 2 ? hex_value(in[i + 1]) : -1, lo = len - i > 2 ? hex_value(in[i + 2]) : -1;
            if (hi < 0 || lo < 0)
                return -1;
            c = (uint8_t)(hi << 4 | lo);
            i += 2;
        } else if (c == '+' && plus) {
            c = ' ';
        }
        if (n == cap)
            return -2;
        out[n++] = c;
    }
    *out_len = n;
    return 0;
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 with padding (RFC 4648 section 4); out holds 4 * ceil(len / 3) characters. */
static size_t base64_encode(const uint8_t *in, size_t len, char *out)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t w = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0) |
                     (i + 2 < len ? in[i + 2] : 0);
        out[n++] = B64[w >> 18 & 63];
        out[n++] = B64[w >> 12 & 63];
        out[n++] = i + 1 < len ? B64[w >> 6 & 63] : '=';
        out[n++] = i + 2 < len ? B64[w & 63] : '=';
    }
    return n;
}

static int base64_value(uint8_t c)
{
    const char *p = c ? strchr(B64, c) : NULL;
    return p ? (int)(p - B64) : -1;
}

/* The inverse, strictly: padded, no whitespace. Returns 0, or -1 if `in` is not base64 or too long. */
static int base64_decode(const uint8_t *in, size_t len, uint8_t *out, size_t cap, size_t *out_len)
{
    size_t n = 0;
    if (len % 4)
        return -1;
    for (size_t i = 0; i < len; i += 4) {
        uint32_t w = 0;
        int pad = 0;
        for (int j = 0; j < 4; j++) {
            int v = 0;
            if (in[i + j] == '=') {
                if (i + 4 != len || j < 2)
                    return -1;
                pad++;
            } else if (pad || (v = base64_value(in[i + j])) < 0) {
                return -1;
            }
            w = w << 6 | (uint32_t)v;
        }
        if (n + 3 - (size_t)pad > cap)
            return -1;
        out[n++] = (uint8_t)(w >> 16);
        if (pad < 2)
            out[n++] = (uint8_t)(w >> 8);
        if (pad < 1)
            out[n++] = (uint8_t)w;
    }
    *out_len = n;
    return 0;
}

/* ============================================================================================
 * HTTP/1.1 requests (RFC 9112): the head, then Content-Length bytes of body.
 * ============================================================================================ */

struct request {
    const uint8_t *method, *target, *ctype, *body;
    size_t method_len, target_len, ctype_len, body_len;
};

struct head {
    int minor;             /* HTTP/1.minor */
    bool host, length, transfer_encoding;
    uint64_t content_length;
    unsigned fields;
};

enum { NEED_MORE = 0, COMPLETE = 1 }; /* or an error status, >= 400 */

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

static const char *reason(int status)
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

static int request_line(const uint8_t *p, const uint8_t *end, struct request *rq, struct head *h)
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

static int header_field(const uint8_t *p, const uint8_t *end, struct request *rq, struct head *h)
{
    const uint8_t *colon = memchr(p, ':', (size_t)(end - p));
    if (!colon || !all_tchars(p, colon)) /* also refuses "Name :" and obsolete line folding */
        return 400;
    if (++h->fields > MAX_HEADER_FIELDS)
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

static int parse_head(const uint8_t *p, const uint8_t *limit, struct request *rq, struct head *h)
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

static int parse_request(const uint8_t *buf, size_t len, bool eof, struct request *rq)
{
    struct head h = {0};
    size_t start = 0;
    while (start < len && (buf[start] == '\r' || buf[start] == '\n'))
        start++; /* RFC 9112 section 2.2: empty lines before the request line are ignored */
    size_t head_end = find_head_end(buf, start, len);
    if (!head_end)
        return len - start > METADATA_HEAD_MAX ? 431 : eof ? 400 : NEED_MORE;
    if (head_end - start > METADATA_HEAD_MAX)
        return 431;
    *rq = (struct request){0};
    int status = parse_head(buf + start, buf + head_end, rq, &h);
    if (status)
        return status;
    if (h.transfer_encoding)
        return 501; /* no chunked bodies: a form is small and every client sends Content-Length */
    if (h.minor >= 1 && !h.host)
        return 400; /* RFC 9112 section 3.2 */
    if (h.content_length > METADATA_REQUEST_MAX - head_end)
        return 413;
    if (len - head_end < h.content_length)
        return eof ? 400 : NEED_MORE;
    rq->body = buf + head_end;
    rq->body_len = (size_t)h.content_length;
    return COMPLETE;
}

/* ============================================================================================
 * The endpoints (spec/ace.md, "App Container Metadata Service").
 * ============================================================================================ */

static uint8_t scratch[METADATA_REQUEST_MAX]; /* a form's decoded content: one request at a time */

static void reply(struct md_reply *r, int status, const char *type, const void *body, size_t len)
{
    r->status = status;
    r->type = type;
    r->body = body;
    r->body_len = len;
}

static void reply_error(struct md_reply *r, int status)
{
    int n = snprintf((char *)r->text, sizeof r->text, "%d %s\n", status, reason(status));
    reply(r, status, TEXT, r->text, (size_t)n);
}

static bool method_is(const struct request *rq, const char *m)
{
    return rq->method_len == strlen(m) && memcmp(rq->method, m, rq->method_len) == 0;
}

static void get(const struct request *rq, struct md_reply *r, const char *type, const void *body, size_t len)
{
    r->head = method_is(rq, "HEAD");
    if (!r->head && !method_is(rq, "GET")) {
        reply_error(r, 405);
        r->allow = "GET, HEAD";
        return;
    }
    reply(r, 200, type, body, len);
}

static void get_doc(const struct request *rq, struct md_reply *r, const char *type, const struct doc *d)
{
    get(rq, r, type, d->data, d->len);
}

/* No Content-Type is taken as a form, as most servers do; anything but a urlencoded form is refused. */
static bool is_form(const struct request *rq)
{
    static const char FORM[] = "application/x-www-form-urlencoded";
    if (!rq->ctype)
        return true;
    const uint8_t *semi = memchr(rq->ctype, ';', rq->ctype_len);
    size_t n = semi ? (size_t)(semi - rq->ctype) : rq->ctype_len;
    while (n && (rq->ctype[n - 1] == ' ' || rq->ctype[n - 1] == '\t'))
        n--;
    return n == sizeof FORM - 1 && strncasecmp((const char *)rq->ctype, FORM, n) == 0;
}

/* The value of the first field `name` of the form body, decoded. Returns 1 found, 0 absent, -1 malformed,
 * -2 too long for out. */
static int form_get(const struct request *rq, const char *name, uint8_t *out, size_t cap, size_t *out_len)
{
    const uint8_t *p = rq->body, *end = rq->body + rq->body_len;
    size_t name_len = strlen(name);
    for (;;) {
        const uint8_t *amp = memchr(p, '&', (size_t)(end - p));
        const uint8_t *stop = amp ? amp : end;
        const uint8_t *eq = memchr(p, '=', (size_t)(stop - p));
        const uint8_t *key_end = eq ? eq : stop;
        uint8_t key[32];
        size_t key_len;
        if (url_decode(p, (size_t)(key_end - p), true, key, sizeof key, &key_len) == 0 && key_len == name_len &&
            memcmp(key, name, name_len) == 0) {
            const uint8_t *v = eq ? eq + 1 : stop;
            int rc = url_decode(v, (size_t)(stop - v), true, out, cap, out_len);
            return rc < 0 ? rc : 1;
        }
        if (!amp)
            return 0;
        p = amp + 1;
    }
}

/* HMAC-SHA512 over the pod's UUID (its 16 bytes) and the content, as rkt's metadata service signs:
 * a signature says which pod made it. */
static void pod_mac(const uint8_t *content, size_t len, uint8_t out[SHA512_DIGEST_LEN])
{
    struct hmac_sha512 h;
    hmac_sha512_init(&h, md.key, md.key_len);
    hmac_sha512_update(&h, md.uuid, sizeof md.uuid);
    hmac_sha512_update(&h, content, len);
    hmac_sha512_final(&h, out);
}

static void sign(const struct request *rq, struct md_reply *r)
{
    uint8_t mac[SHA512_DIGEST_LEN];
    size_t len;
    if (form_get(rq, "content", scratch, sizeof scratch, &len) != 1) {
        reply_error(r, 400);
        return;
    }
    pod_mac(scratch, len, mac);
    _Static_assert(sizeof r->text >= (SHA512_DIGEST_LEN + 2) / 3 * 4, "a signature fits the reply");
    reply(r, 200, TEXT, r->text, base64_encode(mac, sizeof mac, (char *)r->text));
}

static void verify(const struct request *rq, struct md_reply *r)
{
    uint8_t text[SIGNATURE_TEXT_MAX], uuid[16], sig[SIGNATURE_TEXT_MAX], expected[SHA512_DIGEST_LEN];
    size_t len, sig_len = 0, content_len;
    if (form_get(rq, "uuid", text, sizeof text, &len) != 1 || parse_uuid(text, len, uuid) < 0 ||
        form_get(rq, "content", scratch, sizeof scratch, &content_len) != 1) {
        reply_error(r, 400);
        return;
    }
    int got = form_get(rq, "signature", text, sizeof text, &len);
    if (got == 0 || got == -1 || (got == 1 && base64_decode(text, len, sig, sizeof sig, &sig_len) < 0)) {
        reply_error(r, 400);
        return;
    }
    /* got == -2: far longer than any signature, so it is not one of ours. The agent holds this pod's
     * key only: a signature of another pod cannot be checked here and is refused like a bad one. */
    pod_mac(scratch, content_len, expected);
    bool ok = got == 1 && sig_len == sizeof expected && equal_ct(sig, expected, sizeof expected);
    if (equal_ct(uuid, md.uuid, sizeof uuid) && ok)
        reply(r, 200, TEXT, "", 0);
    else
        reply_error(r, 403);
}

static void post(const struct request *rq, struct md_reply *r,
                 void (*handler)(const struct request *, struct md_reply *))
{
    if (!method_is(rq, "POST")) {
        reply_error(r, 405);
        r->allow = "POST";
    } else if (!is_form(rq)) {
        reply_error(r, 415);
    } else {
        handler(rq, r);
    }
}

static void app_endpoint(const struct request *rq, const char *ep, struct md_reply *r)
{
    const char *name = ep + strlen("/apps/"), *slash = strchr(name, '/');
    struct md_app *a = slash ? find_app(name, (size_t)(slash - name)) : NULL;
    if (!a)
        reply_error(r, 404);
    else if (strcmp(slash, "/annotations") == 0)
        get_doc(rq, r, JSON, &a->docs[APP_ANNOTATIONS]);
    else if (strcmp(slash, "/image/manifest") == 0)
        get_doc(rq, r, JSON, &a->docs[APP_IMAGE_MANIFEST]);
    else if (strcmp(slash, "/image/id") == 0)
        get_doc(rq, r, TEXT, &a->docs[APP_IMAGE_ID]);
    else
        reply_error(r, 404);
}

static void endpoint(const struct request *rq, const char *ep, struct md_reply *r)
{
    if (strcmp(ep, "/pod/annotations") == 0)
        get_doc(rq, r, JSON, &md.pod[POD_ANNOTATIONS]);
    else if (strcmp(ep, "/pod/manifest") == 0)
        get_doc(rq, r, JSON, &md.pod[POD_MANIFEST]);
    else if (strcmp(ep, "/pod/uuid") == 0)
        get(rq, r, TEXT, md.uuid_text, UUID_TEXT_LEN);
    else if (strcmp(ep, "/pod/hmac/sign") == 0)
        post(rq, r, sign);
    else if (strcmp(ep, "/pod/hmac/verify") == 0)
        post(rq, r, verify);
    else if (strncmp(ep, "/apps/", strlen("/apps/")) == 0)
        app_endpoint(rq, ep, r);
    else
        reply_error(r, 404);
}

/* The path after "/TOKEN/acMetadata/v1", or NULL: another token, or not the service's path at all.
 * A wrong token is answered exactly like an unknown path, so nobody learns whether it exists. */
static const char *endpoint_path(const char *path, size_t len)
{
    const char *seg = path + 1, *slash = memchr(seg, '/', len - 1);
    size_t seg_len = slash ? (size_t)(slash - seg) : len - 1;
    /* The token is the secret: compared in time independent of its content. */
    bool ok = seg_len == md.token_len && equal_ct(seg, md.token, seg_len);
    if (!ok || !slash || strncmp(slash, API_PREFIX "/", strlen(API_PREFIX "/")) != 0)
        return NULL;
    return slash + strlen(API_PREFIX);
}

static void route(const struct request *rq, struct md_reply *r)
{
    static char path[METADATA_HEAD_MAX + 1];
    size_t raw = 0, len;
    while (raw < rq->target_len && rq->target[raw] != '?' && rq->target[raw] != '#')
        raw++; /* a query string is ignored */
    if (raw == 0 || rq->target[0] != '/' || url_decode(rq->target, raw, false, (uint8_t *)path, sizeof path - 1,
                                                       &len) < 0 || memchr(path, '\0', len)) {
        reply_error(r, 400); /* origin-form only, and well-formed */
        return;
    }
    path[len] = '\0';
    const char *ep = endpoint_path(path, len);
    snprintf(r->what, sizeof r->what, "%.*s %s", (int)rq->method_len, (const char *)rq->method,
             ep ? ep : "(not under the token)");
    one_line(r->what);
    if (ep)
        endpoint(rq, ep, r);
    else
        reply_error(r, 404);
}

bool metadata_respond(const uint8_t *req, size_t len, bool eof, struct md_reply *r)
{
    struct request rq;
    *r = (struct md_reply){.what = "(malformed request)"};
    int status = parse_request(req, len, eof, &rq);
    if (status == NEED_MORE)
        return false;
    if (status == COMPLETE)
        route(&rq, r);
    else
        reply_error(r, status);
    return true;
}

size_t metadata_head(const struct md_reply *r, char *out, size_t cap)
{
    int n = snprintf(out, cap,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s%s%sConnection: close\r\n\r\n",
                     r->status, reason(r->status), r->type, r->body_len, r->allow ? "Allow: " : "",
                     r->allow ? r->allow : "", r->allow ? "\r\n" : "");
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

/* ============================================================================================
 * Connections: non-blocking, one request each (Connection: close), served from the event loop.
 * ============================================================================================ */

enum conn_state { C_FREE, C_READING, C_WRITING, C_LINGER };

struct conn {
    enum conn_state state;
    int fd;
    size_t len; /* request bytes in its buffer */
    bool eof;
    struct md_reply reply;
    char head[320];
    size_t head_len, sent; /* sent: of the head and the body together */
    uint64_t accepted, deadline;
};

static struct conn conns[METADATA_MAX_CONNS];
static uint8_t bufs[METADATA_MAX_CONNS][METADATA_REQUEST_MAX];
static int listen_fd = -1, timer_fd = -1;
static uint64_t timer_set_to; /* the deadline the timer is armed for, 0: disarmed */

static void conn_close(struct conn *c)
{
    close(c->fd);
    *c = (struct conn){.state = C_FREE, .fd = -1};
}

static void progress(struct conn *c)
{
    c->deadline = boottime_ns() + (uint64_t)IDLE_MS * 1000000u;
}

/* Reads and drops what the client still sends after the answer, until it closes (or LINGER_MS). */
static void conn_drain(struct conn *c)
{
    uint8_t sink[4096];
    for (int i = 0; i < DRAIN_ROUNDS; i++) {
        ssize_t n = recv(c->fd, sink, sizeof sink, 0);
        if (n > 0 || (n < 0 && errno == EINTR))
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        break;
    }
    conn_close(c);
}

static void conn_write(struct conn *c)
{
    size_t body_len = c->reply.head ? 0 : c->reply.body_len, total = c->head_len + body_len;
    while (c->sent < total) {
        struct iovec iov[2];
        size_t n = 0, body_off = c->sent > c->head_len ? c->sent - c->head_len : 0;
        if (c->sent < c->head_len)
            iov[n++] = (struct iovec){c->head + c->sent, c->head_len - c->sent};
        if (body_len > body_off)
            iov[n++] = (struct iovec){(void *)(c->reply.body + body_off), body_len - body_off};
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = n};
        ssize_t w = sendmsg(c->fd, &m, MSG_NOSIGNAL);
        if (w > 0) {
            c->sent += (size_t)w;
            progress(c);
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && errno == EAGAIN) {
            return;
        } else {
            conn_close(c); /* the client has gone */
            return;
        }
    }
    /* Half-close, then drain: closing with unread request bytes would make the kernel reset the
     * connection, and a reset can destroy the answer before the client has read it. */
    shutdown(c->fd, SHUT_WR);
    c->state = C_LINGER;
    c->deadline = boottime_ns() + (uint64_t)LINGER_MS * 1000000u;
    conn_drain(c);
}

static void conn_answer(struct conn *c)
{
    c->head_len = metadata_head(&c->reply, c->head, sizeof c->head);
    c->sent = 0;
    c->state = C_WRITING;
    log_debug("metadata: %s: %d (%llu us)", c->reply.what, c->reply.status,
              (unsigned long long)(boottime_ns() - c->accepted) / 1000u);
    conn_write(c);
}

static void conn_read(struct conn *c)
{
    uint8_t *buf = bufs[c - conns];
    while (c->len < METADATA_REQUEST_MAX && !c->eof) {
        ssize_t n = recv(c->fd, buf + c->len, METADATA_REQUEST_MAX - c->len, 0);
        if (n > 0) {
            c->len += (size_t)n;
            progress(c);
        } else if (n == 0) {
            c->eof = true;
        } else if (errno == EAGAIN) {
            break;
        } else if (errno != EINTR) {
            conn_close(c);
            return;
        }
    }
    if (c->len == 0 && c->eof) {
        conn_close(c); /* connected and went away: nothing to answer */
        return;
    }
    if (metadata_respond(buf, c->len, c->eof, &c->reply))
        conn_answer(c);
    else if (c->len == METADATA_REQUEST_MAX) { /* cannot happen: the parser caps both parts first */
        reply_error(&c->reply, 413);
        conn_answer(c);
    }
}

static struct conn *free_conn(void)
{
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        if (conns[i].state == C_FREE)
            return &conns[i];
    return NULL;
}

/* With every slot taken the listener is not polled: new clients wait in the kernel's backlog. */
static void accept_conns(void)
{
    struct conn *c;
    while ((c = free_conn())) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return; /* EAGAIN: nobody else is waiting */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        *c = (struct conn){.state = C_READING, .fd = fd, .accepted = boottime_ns()};
        progress(c);
        conn_read(c); /* the request is often there already */
    }
}

static void expire_conns(void)
{
    uint64_t now = boottime_ns();
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        if (conns[i].state != C_FREE && conns[i].deadline <= now) {
            if (conns[i].state != C_LINGER)
                log_debug("metadata: connection closed after %u ms without progress", IDLE_MS);
            conn_close(&conns[i]);
        }
}

/* One timer for every connection's deadline: the event loop itself polls without a timeout. */
static void arm_timer(void)
{
    uint64_t next = 0;
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        if (conns[i].state != C_FREE && (!next || conns[i].deadline < next))
            next = conns[i].deadline;
    if (next == timer_set_to)
        return;
    struct itimerspec its = {.it_value = {.tv_sec = (time_t)(next / 1000000000u),
                                          .tv_nsec = (long)(next % 1000000000u)}};
    if (timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
        timer_set_to = next;
}

enum role { ROLE_TIMER, ROLE_LISTEN, ROLE_CONN };

static struct {
    enum role role;
    struct conn *c;
    int fd;
} refs[METADATA_MAX_POLLFDS];

static size_t add_pollfd(struct pollfd *pfd, size_t n, size_t max, int fd, short events, enum role role,
                         struct conn *c)
{
    if (n >= max || n >= ARRAY_LEN(refs))
        return n;
    pfd[n] = (struct pollfd){.fd = fd, .events = events};
    refs[n].role = role;
    refs[n].c = c;
    refs[n].fd = fd;
    return n + 1;
}

size_t metadata_pollfds(struct pollfd *pfd, size_t max)
{
    if (listen_fd < 0)
        return 0;
    arm_timer();
    size_t n = add_pollfd(pfd, 0, max, timer_fd, POLLIN, ROLE_TIMER, NULL);
    if (free_conn())
        n = add_pollfd(pfd, n, max, listen_fd, POLLIN, ROLE_LISTEN, NULL);
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        if (conns[i].state != C_FREE)
            n = add_pollfd(pfd, n, max, conns[i].fd, conns[i].state == C_WRITING ? POLLOUT : POLLIN, ROLE_CONN,
                           &conns[i]);
    return n;
}

void metadata_handle_events(const struct pollfd *pfd, size_t n)
{
    bool incoming = false;
    for (size_t i = 0; i < n; i++) {
        struct conn *c = refs[i].c;
        if (!pfd[i].revents)
            continue;
        if (refs[i].role == ROLE_TIMER) {
            uint64_t ticks;
            while (read(timer_fd, &ticks, sizeof ticks) > 0)
                ;
            timer_set_to = 0; /* a one-shot timer that fired is disarmed */
        } else if (refs[i].role == ROLE_LISTEN) {
            incoming = true;
        } else if (c->state != C_FREE && c->fd == refs[i].fd) {
            if (c->state == C_READING)
                conn_read(c);
            else if (c->state == C_WRITING)
                conn_write(c);
            else
                conn_drain(c);
        }
    }
    expire_conns();
    if (incoming) /* last: a slot freed above is not reused within this round */
        accept_conns();
}

/* ============================================================================================
 * Starting: the loopback interface, the listener.
 * ============================================================================================ */

/* Nothing else in the guest configures networking: bring `lo` up (the kernel gives it 127.0.0.1). */
void metadata_loopback_up(void)
{
    struct ifreq ifr = {0};
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        fatal("metadata", errno, "socket: %s (a guest kernel without IPv4?)", strerror(errno));
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        fatal("metadata", errno, "the loopback interface: %s", strerror(errno));
    if (!(ifr.ifr_flags & IFF_UP)) {
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
            fatal("metadata", errno, "bringing the loopback interface up: %s", strerror(errno));
    }
    close(s);
}

static void start_listening(void)
{
    metadata_loopback_up();
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(md.port),
                             .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
    if (fd < 0)
        fatal("metadata", errno, "socket: %s", strerror(errno));
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 128) < 0)
        fatal("metadata", errno, "cannot listen on 127.0.0.1:%u: %s", md.port, strerror(errno));
    if ((timer_fd = timerfd_create(CLOCK_BOOTTIME, TFD_NONBLOCK | TFD_CLOEXEC)) < 0)
        fatal("metadata", errno, "timerfd: %s", strerror(errno));
    listen_fd = fd;
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        conns[i] = (struct conn){.state = C_FREE, .fd = -1};
    log_debug("metadata service on 127.0.0.1:%u for %zu apps", md.port, md.n_apps);
}

void metadata_handle_frame(const struct frame *f)
{
    struct failure err;
    if (metadata_load(f, &err) < 0)
        fatal_failure(&err);
    if (f->type == KP_MSG_METADATA_START)
        start_listening();
}
