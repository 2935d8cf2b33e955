#include "metadata_api.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "encoding.h"
#include "http_parse.h"
#include "metadata.h"
#include "sha512.h"

#define API_PREFIX "/acMetadata/v1"
#define JSON "application/json"
#define TEXT "text/plain; charset=us-ascii"
#define SIGNATURE_TEXT_MAX 512 /* a base64 HMAC-SHA512 is 88 characters */

static const struct http_limits LIMITS = {
    .head_max = METADATA_HEAD_MAX, .request_max = METADATA_REQUEST_MAX, .fields_max = METADATA_FIELDS_MAX};

static uint8_t scratch[METADATA_REQUEST_MAX]; /* a form's decoded content: one request at a time */

static void reply(struct md_reply *r, int status, const char *type, const void *body, size_t len)
{
    r->status = status;
    r->type = type;
    r->body = body;
    r->body_len = len;
}

void metadata_reply_error(struct md_reply *r, int status)
{
    int n = snprintf((char *)r->text, sizeof r->text, "%d %s\n", status, http_reason(status));
    reply(r, status, TEXT, r->text, (size_t)n);
}

static bool method_is(const struct http_request *rq, const char *m)
{
    return rq->method_len == strlen(m) && memcmp(rq->method, m, rq->method_len) == 0;
}

static void get(const struct http_request *rq, struct md_reply *r, const char *type, const void *body, size_t len)
{
    r->head = method_is(rq, "HEAD");
    if (!r->head && !method_is(rq, "GET")) {
        metadata_reply_error(r, 405);
        r->allow = "GET, HEAD";
        return;
    }
    reply(r, 200, type, body, len);
}

static void get_doc(const struct http_request *rq, struct md_reply *r, const char *type, const struct md_doc *d)
{
    get(rq, r, type, d->data, d->len);
}

/* No Content-Type is taken as a form, as most servers do; anything but a urlencoded form is refused. */
static bool is_form(const struct http_request *rq)
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
static int form_get(const struct http_request *rq, const char *name, uint8_t *out, size_t cap, size_t *out_len)
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
static void pod_mac(const struct md_store *s, const uint8_t *content, size_t len, uint8_t out[SHA512_DIGEST_LEN])
{
    struct hmac_sha512 h;
    hmac_sha512_init(&h, s->key, s->key_len);
    hmac_sha512_update(&h, s->uuid, sizeof s->uuid);
    hmac_sha512_update(&h, content, len);
    hmac_sha512_final(&h, out);
}

static void sign(const struct md_store *s, const struct http_request *rq, struct md_reply *r)
{
    uint8_t mac[SHA512_DIGEST_LEN];
    size_t len;
    if (form_get(rq, "content", scratch, sizeof scratch, &len) != 1) {
        metadata_reply_error(r, 400);
        return;
    }
    pod_mac(s, scratch, len, mac);
    _Static_assert(sizeof r->text >= (SHA512_DIGEST_LEN + 2) / 3 * 4, "a signature fits the reply");
    reply(r, 200, TEXT, r->text, base64_encode(mac, sizeof mac, (char *)r->text));
}

static void verify(const struct md_store *s, const struct http_request *rq, struct md_reply *r)
{
    uint8_t text[SIGNATURE_TEXT_MAX], uuid[16], sig[SIGNATURE_TEXT_MAX], expected[SHA512_DIGEST_LEN];
    size_t len, sig_len = 0, content_len;
    if (form_get(rq, "uuid", text, sizeof text, &len) != 1 || md_parse_uuid(text, len, uuid) < 0 ||
        form_get(rq, "content", scratch, sizeof scratch, &content_len) != 1) {
        metadata_reply_error(r, 400);
        return;
    }
    int got = form_get(rq, "signature", text, sizeof text, &len);
    if (got == 0 || got == -1 || (got == 1 && base64_decode(text, len, sig, sizeof sig, &sig_len) < 0)) {
        metadata_reply_error(r, 400);
        return;
    }
    /* got == -2: far longer than any signature, so it is not one of ours. The service holds this pod's
     * key only: a signature of another pod cannot be checked here and is refused like a bad one. */
    pod_mac(s, scratch, content_len, expected);
    bool ok = got == 1 && sig_len == sizeof expected && equal_ct(sig, expected, sizeof expected);
    if (equal_ct(uuid, s->uuid, sizeof uuid) && ok)
        reply(r, 200, TEXT, "", 0);
    else
        metadata_reply_error(r, 403);
}

typedef void form_handler(const struct md_store *, const struct http_request *, struct md_reply *);

static void post(const struct md_store *s, const struct http_request *rq, struct md_reply *r, form_handler *handler)
{
    if (!method_is(rq, "POST")) {
        metadata_reply_error(r, 405);
        r->allow = "POST";
    } else if (!is_form(rq)) {
        metadata_reply_error(r, 415);
    } else {
        handler(s, rq, r);
    }
}

static void app_endpoint(const struct md_store *s, const struct http_request *rq, const char *ep, struct md_reply *r)
{
    const char *name = ep + strlen("/apps/"), *slash = strchr(name, '/');
    const struct md_app *a = slash ? md_find_app(s, name, (size_t)(slash - name)) : NULL;
    if (!a)
        metadata_reply_error(r, 404);
    else if (strcmp(slash, "/annotations") == 0)
        get_doc(rq, r, JSON, &a->docs[MD_APP_ANNOTATIONS]);
    else if (strcmp(slash, "/image/manifest") == 0)
        get_doc(rq, r, JSON, &a->docs[MD_APP_IMAGE_MANIFEST]);
    else if (strcmp(slash, "/image/id") == 0)
        get_doc(rq, r, TEXT, &a->docs[MD_APP_IMAGE_ID]);
    else
        metadata_reply_error(r, 404);
}

static void endpoint(const struct md_store *s, const struct http_request *rq, const char *ep, struct md_reply *r)
{
    if (strcmp(ep, "/pod/annotations") == 0)
        get_doc(rq, r, JSON, &s->pod[MD_POD_ANNOTATIONS]);
    else if (strcmp(ep, "/pod/manifest") == 0)
        get_doc(rq, r, JSON, &s->pod[MD_POD_MANIFEST]);
    else if (strcmp(ep, "/pod/uuid") == 0)
        get(rq, r, TEXT, s->uuid_text, MD_UUID_TEXT_LEN);
    else if (strcmp(ep, "/pod/hmac/sign") == 0)
        post(s, rq, r, sign);
    else if (strcmp(ep, "/pod/hmac/verify") == 0)
        post(s, rq, r, verify);
    else if (strncmp(ep, "/apps/", strlen("/apps/")) == 0)
        app_endpoint(s, rq, ep, r);
    else
        metadata_reply_error(r, 404);
}

/* The path after "/TOKEN/acMetadata/v1", or NULL: another token, or not the service's path at all.
 * A wrong token is answered exactly like an unknown path, so nobody learns whether it exists. */
static const char *endpoint_path(const struct md_store *s, const char *path, size_t len)
{
    const char *seg = path + 1, *slash = memchr(seg, '/', len - 1);
    size_t seg_len = slash ? (size_t)(slash - seg) : len - 1;
    /* The token is the secret: compared in time independent of its content. */
    bool ok = seg_len == s->token_len && equal_ct(seg, s->token, seg_len);
    if (!ok || !slash || strncmp(slash, API_PREFIX "/", strlen(API_PREFIX "/")) != 0)
        return NULL;
    return slash + strlen(API_PREFIX);
}

static void route(const struct md_store *s, const struct http_request *rq, struct md_reply *r)
{
    static char path[METADATA_HEAD_MAX + 1];
    size_t raw = 0, len;
    while (raw < rq->target_len && rq->target[raw] != '?' && rq->target[raw] != '#')
        raw++; /* a query string is ignored */
    if (raw == 0 || rq->target[0] != '/' || url_decode(rq->target, raw, false, (uint8_t *)path, sizeof path - 1,
                                                       &len) < 0 || memchr(path, '\0', len)) {
        metadata_reply_error(r, 400); /* origin-form only, and well-formed */
        return;
    }
    path[len] = '\0';
    const char *ep = endpoint_path(s, path, len);
    snprintf(r->what, sizeof r->what, "%.*s %s", (int)rq->method_len, (const char *)rq->method,
             ep ? ep : "(not under the token)");
    one_line(r->what);
    if (ep)
        endpoint(s, rq, ep, r);
    else
        metadata_reply_error(r, 404);
}

bool metadata_respond(const struct md_store *s, const uint8_t *req, size_t len, bool eof, struct md_reply *r)
{
    struct http_request rq;
    *r = (struct md_reply){.what = "(malformed request)"};
    int status = http_parse_request(req, len, eof, &LIMITS, &rq);
    if (status == HTTP_NEED_MORE)
        return false;
    if (status == HTTP_COMPLETE)
        route(s, &rq, r);
    else
        metadata_reply_error(r, status);
    return true;
}

size_t metadata_head(const struct md_reply *r, char *out, size_t cap)
{
    int n = snprintf(out, cap,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s%s%sConnection: close\r\n\r\n",
                     r->status, http_reason(r->status), r->type, r->body_len, r->allow ? "Allow: " : "",
                     r->allow ? r->allow : "", r->allow ? "\r\n" : "");
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}
