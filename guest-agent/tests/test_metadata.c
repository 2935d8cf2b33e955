/* C unit tests of the metadata service (make -C guest-agent test): SHA-512 against FIPS 180-4's
 * examples, HMAC-SHA512 against RFC 4231's test cases, the METADATA frames into a store, and the HTTP
 * side of the service (parsing, routing, forms, sign and verify) without sockets or a service process
 * (test_http_parse.c takes the request parser alone). The e2e test (tests/e2e/test_metadata.py) checks
 * the same service from inside a real guest. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metadata.h"
#include "metadata_api.h"
#include "metadata_msgs.h"
#include "protocol.h"
#include "sha512.h"
#include "tlv.h"

#include "check.h"

static void hex(const uint8_t *p, size_t len, char *out)
{
    for (size_t i = 0; i < len; i++)
        sprintf(out + 2 * i, "%02x", p[i]);
}

/* --- SHA-512 --- */

static void check_sha512(const void *data, size_t len, size_t piece, const char *expected)
{
    struct sha512 c;
    uint8_t d[SHA512_DIGEST_LEN];
    char got[2 * SHA512_DIGEST_LEN + 1];
    sha512_init(&c);
    for (size_t off = 0; off < len; off += piece)
        sha512_update(&c, (const uint8_t *)data + off, len - off < piece ? len - off : piece);
    sha512_final(&c, d);
    hex(d, sizeof d, got);
    CHECK(strcmp(got, expected) == 0, "sha512 of %zu bytes (pieces of %zu): %s", len, piece, got);
}

static void test_sha512(void)
{
    /* FIPS 180-4 examples (csrc.nist.gov, "SHA512.pdf" and the long-message example). */
    static const char ABC448[] = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    static const char ABC896[] = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnop"
                                 "jklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
    check_sha512("abc", 3, 3, "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23"
                              "a3feebbd454d4423643ce80e2a9ac94fa54ca49f");
    check_sha512("", 0, 1, "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2"
                           "877eec2f63b931bd47417a81a538327af927da3e");
    check_sha512(ABC448, strlen(ABC448), 5, "204a8fc6dda82f0a0ced7beb8e08a41657c16ef468b228a8279be331a703c33596fd15c"
                                            "13b1b07f9aa1d3bea57789ca031ad85c7a71dd70354ec631238ca3445");
    /* 112 bytes: the padding needs a block of its own */
    check_sha512(ABC896, strlen(ABC896), 112, "8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018501d28"
                                              "9e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909");
    char *million = malloc(1000000);
    memset(million, 'a', 1000000);
    check_sha512(million, 1000000, 997, "e718483d0ce769644e2e42c7bc15b4638e1f98b13b2044285632a803afa973ebde0ff244877"
                                        "ea60a4cb0432ce577c31beb009c5c2c49aa2e4eadb217ad8cc09b");
    /* block and padding boundaries (values from Python's hashlib) */
    check_sha512(million, 111, 111, "fa9121c7b32b9e01733d034cfc78cbf67f926c7ed83e82200ef86818196921760b4beff48404df81"
                                    "1b953828274461673c68d04e297b0eb7b2b4d60fc6b566a2");
    check_sha512(million, 127, 64, "828613968b501dc00a97e08c73b118aa8876c26b8aac93df128502ab360f91bab50a51e088769a5c1"
                                   "eff4782ace147dce3642554199876374291f5d921629502");
    check_sha512(million, 128, 128, "b73d1929aa615934e61a871596b3f3b33359f42b8175602e89f7e06e5f658a243667807ed300314b"
                                    "95cacdd579f3e33abdfbe351909519a846d465c59582f321");
    check_sha512(million, 129, 1, "4f681e0bd53cda4b5a2041cc8a06f2eabde44fb16c951fbd5b87702f07aeab611565b19c47fde3058"
                                  "7177ebb852e3971bbd8d3fd30da18d71037dfbd98420429");
    check_sha512(million, 239, 100, "52c853cb8d907f3d4d6b889beb027985d7c273486d75f8baf26f80d24e90c74c6c3de3e221315823"
                                    "80a7d14d43f2941a31385439cd6ddc469f628015e50bf286");
    free(million);
}

/* --- HMAC-SHA512: RFC 4231 section 4 --- */

static void test_hmac(void)
{
    static const char LONG_DATA[] = "This is a test using a larger than block-size key and a larger than block-size "
                                    "data. The key needs to be hashed before being used by the HMAC algorithm.";
    uint8_t k0b[20], kaa20[20], kcd[25], dd[50], cd[50], k0c[20], kaa131[131];
    memset(k0b, 0x0b, sizeof k0b);
    memset(kaa20, 0xaa, sizeof kaa20);
    for (int i = 0; i < 25; i++)
        kcd[i] = (uint8_t)(i + 1);
    memset(dd, 0xdd, sizeof dd);
    memset(cd, 0xcd, sizeof cd);
    memset(k0c, 0x0c, sizeof k0c);
    memset(kaa131, 0xaa, sizeof kaa131);
    const struct {
        const void *key, *data;
        size_t key_len, data_len, compare; /* case 5 compares the first 128 bits only */
        const char *mac;
    } cases[] = {
        {k0b, "Hi There", 20, 8, 64,
         "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cdedaa833b7d6b8a702038b274eaea3f4e4be9d914eeb6"
         "1f1702e696c203a126854"},
        {"Jefe", "what do ya want for nothing?", 4, 28, 64,
         "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4"
         "a6b4b636e070a38bce737"},
        {kaa20, dd, 20, 50, 64,
         "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39bf3e848279a722c806b485a47e67c807b946a337bee"
         "8942674278859e13292fb"},
        {kcd, cd, 25, 50, 64,
         "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3dba91ca5c11aa25eb4d679275cc5788063a5f19741120"
         "c4f2de2adebeb10a298dd"},
        {k0c, "Test With Truncation", 20, 20, 16, "415fad6271580a531d4179bc891d87a6"},
        {kaa131, "Test Using Larger Than Block-Size Key - Hash Key First", 131, 54, 64,
         "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f3526b56d037e05f2598bd0fd2215d6a1e5295e64f73f63"
         "f0aec8b915a985d786598"},
        {kaa131, LONG_DATA, 131, sizeof LONG_DATA - 1, 64,
         "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944b6022cac3c4982b10d5eeb55c3e4de15134676fb6de"
         "0446065c97440fa8c6a58"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct hmac_sha512 h;
        uint8_t mac[SHA512_DIGEST_LEN];
        char got[2 * SHA512_DIGEST_LEN + 1];
        hmac_sha512_init(&h, cases[i].key, cases[i].key_len);
        hmac_sha512_update(&h, cases[i].data, cases[i].data_len);
        hmac_sha512_final(&h, mac);
        hex(mac, cases[i].compare, got);
        CHECK(strcmp(got, cases[i].mac) == 0, "RFC 4231 test case %zu: %s", i + 1, got);
    }
    CHECK(equal_ct("abc", "abc", 3) && !equal_ct("abc", "abd", 3) && equal_ct("", "x", 0), "equal_ct");
}

/* --- the service, without sockets --- */

#define UUID "6f1c3f8e-2b7a-4c1d-9e5f-0a1b2c3d4e5f"
#define TOKEN "Tok3n_with-enough-entropy-000000000000000000"
#define BASE "/" TOKEN "/acMetadata/v1"
/* bytes 0..63 in hex */
#define KEY_HEX                                                                                                  \
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"                                           \
    "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
/* base64(HMAC-SHA512(key, uuid bytes + "hello world & more")), from Python's hmac module */
#define SIGNATURE "FzEbs6WYVvh9npN7gNnf3vzTutFqlezIYp57xJPqAbDb0l6Hzcld36+I+mtgu1CXzSaRxmQ0u5uAQDVakHzVQA=="
#define SIGNATURE_FORM                                                                                         \
    "FzEbs6WYVvh9npN7gNnf3vzTutFqlezIYp57xJPqAbDb0l6Hzcld36%2BI%2Bmtgu1CXzSaRxmQ0u5uAQDVakHzVQA%3D%3D"

static uint8_t payload[4096];

static struct failure load_error;
static struct md_store store; /* what the frames below load, and the requests are answered from */

static int load(uint16_t type, const struct tlv_writer *w)
{
    struct frame f = {.type = type, .stream = 0, .payload = w->buf, .len = (uint32_t)w->len};
    load_error.msg[0] = '\0';
    return metadata_msgs_load(&store, &f, &load_error);
}

/* The frame is refused with a message that says why. */
#define REFUSED(type, w, why)                                                                                  \
    CHECK(load(type, w) < 0 && strstr(load_error.msg, why) && strcmp(load_error.stage, "protocol") == 0,       \
          "[%s]", load_error.msg)

static void load_app(const char *name, const char *id, const char *manifest, const char *annotations)
{
    struct tlv_writer w = TLV_WRITER(payload);
    tlv_put_str(&w, KP_F_APP_NAME, name);
    tlv_put_str(&w, KP_F_IMAGE_ID, id);
    tlv_put_str(&w, KP_F_IMAGE_MANIFEST, manifest);
    tlv_put_str(&w, KP_F_APP_ANNOTATIONS, annotations);
    CHECK(load(KP_MSG_METADATA, &w) == 0, "app %s", name);
}

static void test_loading(void)
{
    struct tlv_writer w = TLV_WRITER(payload);
    /* a document in pieces: appended in order */
    tlv_put_str(&w, KP_F_POD_MANIFEST, "{\"acKind\":");
    tlv_put_str(&w, KP_F_POD_ANNOTATIONS, "[]");
    CHECK(load(KP_MSG_METADATA, &w) == 0, "pod documents");
    w = (struct tlv_writer)TLV_WRITER(payload);
    tlv_put_str(&w, KP_F_POD_MANIFEST, "\"PodManifest\"}");
    CHECK(load(KP_MSG_METADATA, &w) == 0, "second piece");

    w = (struct tlv_writer)TLV_WRITER(payload);
    tlv_put_str(&w, KP_F_IMAGE_ID, "sha512-00");
    REFUSED(KP_MSG_METADATA, &w, "IMAGE_ID without APP_NAME");
    w = (struct tlv_writer)TLV_WRITER(payload);
    tlv_put_str(&w, KP_F_APP_NAME, "../x");
    REFUSED(KP_MSG_METADATA, &w, "APP_NAME is not a valid app name"); /* one path segment */

    load_app("web", "sha512-abc", "{\"name\":\"example.com/web\"}",
             "[{\"name\":\"b\",\"value\":\"1\"},{\"name\":\"a\",\"value\":\"2\"}]");

    w = (struct tlv_writer)TLV_WRITER(payload);
    tlv_put_str(&w, KP_F_APP_NAME, "half");
    tlv_put_str(&w, KP_F_IMAGE_ID, "sha512-01");
    CHECK(load(KP_MSG_METADATA, &w) == 0, "an app with one document so far");

    struct tlv_writer start = TLV_WRITER((uint8_t[512]){0});
    tlv_put_str(&start, KP_F_POD_UUID, "6F1C3F8E-2B7A-4C1D-9E5F-0A1B2C3D4E5F"); /* upper case: served lower */
    tlv_put_str(&start, KP_F_METADATA_TOKEN, TOKEN);
    tlv_put_str(&start, KP_F_HMAC_KEY, KEY_HEX);
    tlv_put_u32(&start, KP_F_METADATA_PORT, 18112);
    REFUSED(KP_MSG_METADATA_START, &start, "METADATA_START before IMAGE_MANIFEST of app half");
    load_app("half", "", "{}", "[]");

    struct tlv_writer bad = TLV_WRITER((uint8_t[512]){0});
    tlv_put_str(&bad, KP_F_POD_UUID, UUID);
    tlv_put_str(&bad, KP_F_METADATA_TOKEN, "short");
    tlv_put_str(&bad, KP_F_HMAC_KEY, KEY_HEX);
    tlv_put_u32(&bad, KP_F_METADATA_PORT, 18112);
    REFUSED(KP_MSG_METADATA_START, &bad, "METADATA_TOKEN must have 16 to 128 characters");
    bad = (struct tlv_writer)TLV_WRITER((uint8_t[512]){0});
    tlv_put_str(&bad, KP_F_POD_UUID, UUID);
    tlv_put_str(&bad, KP_F_METADATA_TOKEN, TOKEN);
    tlv_put_str(&bad, KP_F_HMAC_KEY, "0001");
    tlv_put_u32(&bad, KP_F_METADATA_PORT, 18112);
    REFUSED(KP_MSG_METADATA_START, &bad, "HMAC_KEY must be 64 to 128 bytes in hex");

    CHECK(load(KP_MSG_METADATA_START, &start) == 0, "METADATA_START");
    REFUSED(KP_MSG_METADATA_START, &start, "METADATA_START after METADATA_START");
    REFUSED(KP_MSG_METADATA, &w, "METADATA after METADATA_START"); /* the documents are final */
}

struct answer {
    bool done;
    int status;
    char type[64], allow[32], head[512];
    char body[4096];
    size_t body_len;
};

static struct answer ask_bytes(const char *req, size_t len, bool eof)
{
    struct md_reply r;
    struct answer a = {0};
    a.done = metadata_respond(&store, (const uint8_t *)req, len, eof, &r);
    if (!a.done)
        return a;
    a.status = r.status;
    snprintf(a.type, sizeof a.type, "%s", r.type);
    snprintf(a.allow, sizeof a.allow, "%s", r.allow ? r.allow : "");
    metadata_head(&r, a.head, sizeof a.head);
    a.body_len = r.head ? 0 : r.body_len;
    if (a.body_len < sizeof a.body && a.body_len)
        memcpy(a.body, r.body, a.body_len);
    return a;
}

static struct answer ask(const char *req)
{
    return ask_bytes(req, strlen(req), false);
}

static struct answer get_path(const char *path)
{
    char req[1024];
    snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:18112\r\n\r\n", path);
    return ask(req);
}

static struct answer post_form(const char *path, const char *form)
{
    char req[2048];
    snprintf(req, sizeof req,
             "POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
             "Content-Length: %zu\r\n\r\n%s",
             path, strlen(form), form);
    return ask(req);
}

static void expect(struct answer a, int status, const char *type, const char *body, int line)
{
    checks++;
    if (a.done && a.status == status && strcmp(a.type, type) == 0 && a.body_len == strlen(body) &&
        memcmp(a.body, body, a.body_len) == 0)
        return;
    failures++;
    fprintf(stderr, "%s:%d: FAILED: got %d %s [%.*s], expected %d %s [%s]\n", __FILE__, line, a.status, a.type,
            (int)a.body_len, a.body, status, type, body);
}

#define EXPECT(a, status, type, body) expect(a, status, type, body, __LINE__)

#define TEXT "text/plain; charset=us-ascii"
#define JSON "application/json"

static void test_documents(void)
{
    EXPECT(get_path(BASE "/pod/uuid"), 200, TEXT, UUID);
    EXPECT(get_path(BASE "/pod/manifest"), 200, JSON, "{\"acKind\":\"PodManifest\"}");
    EXPECT(get_path(BASE "/pod/annotations"), 200, JSON, "[]");
    EXPECT(get_path(BASE "/apps/web/annotations"), 200, JSON,
           "[{\"name\":\"b\",\"value\":\"1\"},{\"name\":\"a\",\"value\":\"2\"}]");
    EXPECT(get_path(BASE "/apps/web/image/manifest"), 200, JSON, "{\"name\":\"example.com/web\"}");
    EXPECT(get_path(BASE "/apps/web/image/id"), 200, TEXT, "sha512-abc");
    EXPECT(get_path(BASE "/apps/half/image/id"), 200, TEXT, "sha512-01"); /* + the empty piece */
    /* a query string is ignored; the path is %-decoded */
    EXPECT(get_path(BASE "/pod/uuid?x=1"), 200, TEXT, UUID);
    EXPECT(get_path(BASE "/pod/%75uid"), 200, TEXT, UUID);

    struct answer a = get_path(BASE "/pod/uuid");
    CHECK(strcmp(a.head, "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Length: 36\r\n"
                         "Connection: close\r\n\r\n") == 0,
          "head: %s", a.head);
    a = ask("HEAD " BASE "/pod/uuid HTTP/1.1\r\nHost: x\r\n\r\n");
    CHECK(a.status == 200 && a.body_len == 0 && strstr(a.head, "Content-Length: 36\r\n"), "HEAD: %s", a.head);
    /* HTTP/1.0 needs no Host; bare LF line ends are accepted; so is a Metadata-Flavor header */
    EXPECT(ask("GET " BASE "/pod/uuid HTTP/1.0\n\n"), 200, TEXT, UUID);
    EXPECT(ask("\r\nGET " BASE "/pod/uuid HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: AppContainer\r\n\r\n"), 200, TEXT,
           UUID);
}

static void test_not_found(void)
{
    const char *paths[] = {
        "/Tok3n_with-enough-entropy-000000000000000001/acMetadata/v1/pod/uuid", /* same length, wrong */
        "/Tok3n/acMetadata/v1/pod/uuid",
        "/acMetadata/v1/pod/uuid",
        "/" TOKEN,
        "/" TOKEN "/",
        "/" TOKEN "/acMetadata/v2/pod/uuid",
        BASE,
        BASE "/",
        BASE "/pod/uuid/",
        BASE "/pod/nothing",
        BASE "/apps/nobody/image/id",
        BASE "/apps/web",
        BASE "/apps/web/",
        BASE "/apps/web/image",
        BASE "/apps//image/id",
        "/",
    };
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        struct answer a = get_path(paths[i]);
        CHECK(a.status == 404 && strcmp(a.type, TEXT) == 0 && strcmp(a.body, "404 Not Found\n") == 0, "%s: %d",
              paths[i], a.status);
    }
}

static void test_sign_and_verify(void)
{
    EXPECT(post_form(BASE "/pod/hmac/sign", "content=hello+world+%26+more"), 200, TEXT, SIGNATURE);
    EXPECT(post_form(BASE "/pod/hmac/sign", "other=1&content=hello%20world%20%26%20more&content=x"), 200, TEXT,
           SIGNATURE);
    EXPECT(post_form(BASE "/pod/hmac/verify", "content=hello+world+%26+more&uuid=" UUID "&signature=" SIGNATURE_FORM),
           200, TEXT, "");
    /* upper-case UUID text is the same UUID */
    EXPECT(post_form(BASE "/pod/hmac/verify", "uuid=6F1C3F8E-2B7A-4C1D-9E5F-0A1B2C3D4E5F&content=hello+world+%26+more"
                                              "&signature=" SIGNATURE_FORM),
           200, TEXT, "");
    EXPECT(post_form(BASE "/pod/hmac/verify", "content=hello+world+%26+mord&uuid=" UUID "&signature=" SIGNATURE_FORM),
           403, TEXT, "403 Forbidden\n");
    EXPECT(post_form(BASE "/pod/hmac/verify",
                     "content=hello+world+%26+more&uuid=6f1c3f8e-2b7a-4c1d-9e5f-0a1b2c3d4e50"
                     "&signature=" SIGNATURE_FORM),
           403, TEXT, "403 Forbidden\n");
    EXPECT(post_form(BASE "/pod/hmac/verify", "content=hello+world+%26+more&uuid=" UUID "&signature=AAAA"), 403, TEXT,
           "403 Forbidden\n");
    EXPECT(post_form(BASE "/pod/hmac/verify", "content=x&uuid=" UUID "&signature=not+base64!"), 400, TEXT,
           "400 Bad Request\n");
    EXPECT(post_form(BASE "/pod/hmac/verify", "content=x&uuid=not-a-uuid&signature=AAAA"), 400, TEXT,
           "400 Bad Request\n");
    EXPECT(post_form(BASE "/pod/hmac/verify", "content=x&signature=AAAA"), 400, TEXT, "400 Bad Request\n");
    EXPECT(post_form(BASE "/pod/hmac/sign", "contents=x"), 400, TEXT, "400 Bad Request\n");
    EXPECT(post_form(BASE "/pod/hmac/sign", "content=%zz"), 400, TEXT, "400 Bad Request\n");
    EXPECT(post_form(BASE "/pod/hmac/sign", "content=%4"), 400, TEXT, "400 Bad Request\n");
    struct answer empty = post_form(BASE "/pod/hmac/sign", "content=");
    CHECK(empty.status == 200 && empty.body_len == 88, "empty content is signed: %d", empty.status);
    EXPECT(ask("POST " BASE "/pod/hmac/sign HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n"
               "\r\ncontent=x"),
           415, TEXT, "415 Unsupported Media Type\n");
    /* no Content-Type: a form; parameters and case of the media type do not matter */
    EXPECT(ask("POST " BASE "/pod/hmac/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 28\r\n\r\n"
               "content=hello+world+%26+more"),
           200, TEXT, SIGNATURE);
    EXPECT(ask("POST " BASE "/pod/hmac/sign HTTP/1.1\r\nHost: x\r\nContent-Type: Application/X-WWW-Form-Urlencoded; "
               "charset=utf-8\r\nContent-Length: 28\r\n\r\ncontent=hello+world+%26+more"),
           200, TEXT, SIGNATURE);
}

static void test_methods(void)
{
    struct answer a = ask("POST " BASE "/pod/uuid HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    CHECK(a.status == 405 && strcmp(a.allow, "GET, HEAD") == 0 && strstr(a.head, "\r\nAllow: GET, HEAD\r\n"), "%s",
          a.head);
    a = get_path(BASE "/pod/hmac/sign");
    CHECK(a.status == 405 && strcmp(a.allow, "POST") == 0, "%d %s", a.status, a.allow);
    a = ask("DELETE " BASE "/apps/web/image/id HTTP/1.1\r\nHost: x\r\n\r\n");
    CHECK(a.status == 405, "%d", a.status);
    /* a wrong token is a 404 whatever the method */
    a = ask("DELETE /wrong/acMetadata/v1/pod/uuid HTTP/1.1\r\nHost: x\r\n\r\n");
    CHECK(a.status == 404, "%d", a.status);
}

static void test_malformed(void)
{
    const struct {
        const char *req;
        int status;
    } cases[] = {
        {"GARBAGE\r\n\r\n", 400},
        {"GET " BASE "/pod/uuid HTTP/1.1\r\n\r\n", 400},                    /* no Host */
        {"GET " BASE "/pod/uuid HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400}, /* two */
        {"GET " BASE "/pod/uuid HTTP/2.0\r\nHost: x\r\n\r\n", 505},
        {"GET " BASE "/pod/uuid HTTP/1.1 \r\nHost: x\r\n\r\n", 400},
        {"GET  " BASE "/pod/uuid HTTP/1.1\r\nHost: x\r\n\r\n", 400},
        {"GET http://x" BASE "/pod/uuid HTTP/1.1\r\nHost: x\r\n\r\n", 400}, /* origin-form only */
        {"GET " BASE "/pod/uu%00id HTTP/1.1\r\nHost: x\r\n\r\n", 400},
        {"GET " BASE "/pod/uu%zzid HTTP/1.1\r\nHost: x\r\n\r\n", 400},
        {"GET " BASE "/pod/uuid HTTP/1.1\r\nHost : x\r\n\r\n", 400},
        {"GET " BASE "/pod/uuid HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400},
        {"GET " BASE "/pod/uuid HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400},
        {"POST " BASE "/pod/hmac/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n", 400},
        {"POST " BASE "/pod/hmac/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400},
        {"POST " BASE "/pod/hmac/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n", 413},
        {"POST " BASE "/pod/hmac/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 413},
        {"POST " BASE "/pod/hmac/sign HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct answer a = ask(cases[i].req);
        CHECK(a.done && a.status == cases[i].status, "case %zu: %d, expected %d", i, a.status, cases[i].status);
    }
    /* incomplete: more is needed, unless the client has finished sending */
    const char *partial = "GET " BASE "/pod/uuid HTTP/1.1\r\nHost: x\r\n";
    CHECK(!ask_bytes(partial, strlen(partial), false).done, "an incomplete head waits");
    CHECK(ask_bytes(partial, strlen(partial), true).status == 400, "an incomplete head at EOF is a 400");
    const char *short_body = "POST " BASE "/pod/hmac/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\ncontent=";
    CHECK(!ask_bytes(short_body, strlen(short_body), false).done, "an incomplete body waits");
    CHECK(ask_bytes(short_body, strlen(short_body), true).status == 400, "an incomplete body at EOF is a 400");
    /* a head that never ends: 431 as soon as it is too long */
    static char huge[METADATA_HEAD_MAX + 100];
    memset(huge, 'a', sizeof huge - 1);
    memcpy(huge, "GET / HTTP/1.1\r\nX: ", 19);
    CHECK(ask_bytes(huge, sizeof huge - 1, false).status == 431, "an endless head");
    /* too many header fields */
    static char many[4096];
    size_t n = (size_t)snprintf(many, sizeof many, "GET " BASE "/pod/uuid HTTP/1.1\r\nHost: x\r\n");
    for (int i = 0; i < 70; i++)
        n += (size_t)snprintf(many + n, sizeof many - n, "X-%d: y\r\n", i);
    snprintf(many + n, sizeof many - n, "\r\n");
    CHECK(ask(many).status == 431, "too many header fields");
}

int main(void)
{
    test_sha512();
    test_hmac();
    test_loading();
    test_documents();
    test_not_found();
    test_sign_and_verify();
    test_methods();
    test_malformed();
    printf("metadata: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
