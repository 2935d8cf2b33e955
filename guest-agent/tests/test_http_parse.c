/* C unit tests of the metadata service's HTTP request parser alone (src/http_parse.c; make -C guest-agent
 * test): malformed request lines and header fields, the limits, requests arriving a byte at a time, and
 * arbitrary bytes. Every input sits at the very end of a page followed by an inaccessible one, so a read
 * past the bytes the parser was given crashes the test instead of going unnoticed. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "http_parse.h"

#include "check.h"

static const struct http_limits LIMITS = {.head_max = 8192, .request_max = 65536, .fields_max = 64};

#define ARENA_PAGES 20 /* room for the largest input below, then the guard page */
static uint8_t *arena, *guard;

static void arena_init(void)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    arena = mmap(NULL, (ARENA_PAGES + 1) * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (arena == MAP_FAILED || mprotect(arena + ARENA_PAGES * page, page, PROT_NONE) < 0) {
        perror("mmap");
        exit(1);
    }
    guard = arena + ARENA_PAGES * page;
}

/* Parses the bytes placed right before the guard page. */
static int parse_bytes(const void *req, size_t len, bool eof, const struct http_limits *lim, struct http_request *rq)
{
    uint8_t *at = guard - len;
    memcpy(at, req, len);
    int status = http_parse_request(at, len, eof, lim, rq);
    if (status == HTTP_COMPLETE) { /* everything it points at is inside the input */
        CHECK(rq->method >= at && rq->method + rq->method_len <= guard, "method outside the input");
        CHECK(rq->target >= at && rq->target + rq->target_len <= guard, "target outside the input");
        CHECK(rq->body >= at && rq->body + rq->body_len <= guard, "body outside the input");
        CHECK(!rq->ctype || (rq->ctype >= at && rq->ctype + rq->ctype_len <= guard), "type outside the input");
    }
    return status;
}

static int parse(const char *req, bool eof)
{
    struct http_request rq;
    return parse_bytes(req, strlen(req), eof, &LIMITS, &rq);
}

static void test_a_good_request(void)
{
    static const char REQ[] = "POST /t/x?q HTTP/1.1\r\nHost: h\r\nContent-Type:  a/b ; c \r\nContent-Length: 5\r\n\r\nhello";
    struct http_request rq;
    CHECK(parse_bytes(REQ, sizeof REQ - 1, false, &LIMITS, &rq) == HTTP_COMPLETE, "complete");
    CHECK(rq.method_len == 4 && memcmp(rq.method, "POST", 4) == 0, "method");
    CHECK(rq.target_len == 6 && memcmp(rq.target, "/t/x?q", 6) == 0, "target");
    CHECK(rq.ctype_len == 7 && memcmp(rq.ctype, "a/b ; c", 7) == 0, "Content-Type without its outer blanks");
    CHECK(rq.body_len == 5 && memcmp(rq.body, "hello", 5) == 0, "body");
    /* every prefix needs more, or is a 400 once the client has finished */
    for (size_t len = 0; len < sizeof REQ - 1; len++) {
        CHECK(parse_bytes(REQ, len, false, &LIMITS, &rq) == HTTP_NEED_MORE, "prefix of %zu bytes", len);
        int at_eof = parse_bytes(REQ, len, true, &LIMITS, &rq);
        CHECK(at_eof == 400, "prefix of %zu bytes at EOF: %d", len, at_eof);
    }
    /* bytes after the body (a pipelined request) are not the parser's */
    CHECK(parse("GET / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\n", false) == HTTP_COMPLETE, "extra bytes");
}

static void test_malformed(void)
{
    static const struct {
        const char *req;
        int status;
    } cases[] = {
        {"/\r\n\r\n", 400},                                   /* no method */
        {" GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400},          /* leading blank */
        {"GET\r\nHost: h\r\n\r\n", 400},                       /* no target */
        {"GET /\r\nHost: h\r\n\r\n", 400},                     /* no version: HTTP/0.9 is not spoken */
        {"GET / HTTP/1.1 extra\r\nHost: h\r\n\r\n", 400},
        {"GET / http/1.1\r\nHost: h\r\n\r\n", 400},            /* the version is case-sensitive */
        {"GET / HTTP/1.10\r\nHost: h\r\n\r\n", 400},
        {"GET / HTTP/11\r\nHost: h\r\n\r\n", 400},
        {"GET / HTTP/x.1\r\nHost: h\r\n\r\n", 400},
        {"GET / HTTP/0.9\r\nHost: h\r\n\r\n", 505},
        {"GET / HTTP/3.0\r\nHost: h\r\n\r\n", 505},
        {"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400},            /* not a token */
        {"GETTINGLONGERTHANSIXTEEN / HTTP/1.1\r\nHost: h\r\n\r\n", 400},
        {"GET /a\tb HTTP/1.1\r\nHost: h\r\n\r\n", 400},        /* a control character in the target */
        {"GET /a\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\n: empty name\r\nHost: h\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nHo st: h\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nHost: h\x01\r\n\r\n", 400},        /* a control character in a value */
        {"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400},      /* a bare CR inside a line */
        {"GET / HTTP/1.1\r\nHost: h\r\n\tfolded\r\n\r\n", 400}, /* obsolete line folding */
        {"GET / HTTP/1.1\r\nHost: a\r\nhOST: b\r\n\r\n", 400}, /* two Hosts, whatever the case */
        {"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400},  /* HTTP/1.1 without Host */
        {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\nx", 400},
        {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1 1\r\n\r\nx", 400},
        {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", 400},
        {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000000\r\n\r\n", 413},
        {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 65536\r\n\r\n", 413},
        {"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", 501},
        {"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\nx", 501},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int status = parse(cases[i].req, false);
        CHECK(status == cases[i].status, "case %zu: %d, expected %d", i, status, cases[i].status);
    }
    /* what still parses: equal Content-Lengths twice, HTTP/1.0 without Host, bare LF, blank lines first */
    CHECK(parse("\r\n\r\n", false) == HTTP_NEED_MORE && parse("\r\n\r\n", true) == 400, "blank lines only");
    CHECK(parse("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nx", false) ==
              HTTP_COMPLETE, "the same length twice");
    CHECK(parse("GET / HTTP/1.0\r\n\r\n", false) == HTTP_COMPLETE, "HTTP/1.0");
    CHECK(parse("\n\r\n\nGET / HTTP/1.1\nHost: h\n\n", false) == HTTP_COMPLETE, "bare LF, leading blank lines");
}

static void test_limits(void)
{
    static char big[3 * 8192];
    struct http_request rq;
    const struct http_limits small = {.head_max = 64, .request_max = 100, .fields_max = 2};
    static const char TWO[] = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\n\r\n";
    static const char THREE[] = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n";
    CHECK(parse_bytes(TWO, sizeof TWO - 1, false, &small, &rq) == HTTP_COMPLETE, "two fields");
    CHECK(parse_bytes(THREE, sizeof THREE - 1, false, &small, &rq) == 431, "three fields");
    /* a head that does not end is refused once it is longer than allowed, not only at EOF */
    memset(big, 'a', sizeof big);
    memcpy(big, "GET / HTTP/1.1\r\nX: ", 19);
    CHECK(parse_bytes(big, 65, false, &small, &rq) == 431, "an endless head");
    CHECK(parse_bytes(big, 64, false, &small, &rq) == HTTP_NEED_MORE, "a head at the limit may still end");
    CHECK(parse_bytes(big, sizeof big, false, &LIMITS, &rq) == 431, "8 KiB of head");
    /* the body's room is what the head leaves of request_max */
    static const char HEAD[] = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 75\r\n\r\n"; /* 48 bytes */
    CHECK(parse_bytes(HEAD, sizeof HEAD - 1, false, &small, &rq) == 413, "48 + 75 > 100");
    static const char FITS[] = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 52\r\n\r\n";
    CHECK(parse_bytes(FITS, sizeof FITS - 1, false, &small, &rq) == HTTP_NEED_MORE, "48 + 52 = 100");
    /* blank lines before the request line count for nothing but must not run past the buffer */
    memset(big, '\n', sizeof big);
    CHECK(parse_bytes(big, sizeof big, false, &LIMITS, &rq) == HTTP_NEED_MORE, "only blank lines");
    CHECK(parse_bytes(big, sizeof big, true, &LIMITS, &rq) == 400, "only blank lines, then EOF");
}

/* Arbitrary bytes (a fixed xorshift sequence, so a failure repeats), biased towards the characters the
 * parser looks for: it answers every input with one of its results and stays inside it. */
static void test_arbitrary_bytes(void)
{
    static const char ALPHABET[] = "GET POST / HTTP/1.1\r\n:Host: Content-Length: 0123456789 \t\x00\x7f\xff";
    static uint8_t buf[4096];
    uint64_t x = 0x9e3779b97f4a7c15u;
    unsigned bad = 0;
    for (int round = 0; round < 20000; round++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t len = x % sizeof buf;
        for (size_t i = 0; i < len; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            buf[i] = x & 1 ? ALPHABET[(x >> 8) % (sizeof ALPHABET - 1)] : (uint8_t)(x >> 16);
        }
        struct http_request rq;
        int status = parse_bytes(buf, len, x & 2, &LIMITS, &rq);
        if (!(status == HTTP_NEED_MORE || status == HTTP_COMPLETE || status == 400 || status == 413 ||
              status == 431 || status == 501 || status == 505))
            bad++;
    }
    CHECK(bad == 0, "%u inputs got an unknown result", bad);
}

int main(void)
{
    arena_init();
    test_a_good_request();
    test_malformed();
    test_limits();
    test_arbitrary_bytes();
    printf("http_parse: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
