/* SHA-512 (FIPS 180-4) and HMAC-SHA512 (RFC 2104), for the metadata service's identity endpoint.
 * Test vectors: guest-agent/tests/test_metadata.c (make -C guest-agent test). */
#ifndef KVMPOD_SHA512_H
#define KVMPOD_SHA512_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SHA512_DIGEST_LEN 64
#define SHA512_BLOCK_LEN 128

struct sha512 {
    uint64_t h[8];
    uint8_t block[SHA512_BLOCK_LEN];
    size_t used;    /* bytes in block */
    uint64_t total; /* bytes hashed so far (2^64 bytes is far beyond anything the agent hashes) */
};

void sha512_init(struct sha512 *c);
void sha512_update(struct sha512 *c, const void *data, size_t len);
void sha512_final(struct sha512 *c, uint8_t out[SHA512_DIGEST_LEN]);

struct hmac_sha512 {
    struct sha512 inner, outer;
};

/* Any key length: keys longer than a block are hashed first (RFC 2104). */
void hmac_sha512_init(struct hmac_sha512 *h, const void *key, size_t key_len);
void hmac_sha512_update(struct hmac_sha512 *h, const void *data, size_t len);
void hmac_sha512_final(struct hmac_sha512 *h, uint8_t out[SHA512_DIGEST_LEN]);

/* Compares in time that depends only on len, never on where the bytes differ. */
bool equal_ct(const void *a, const void *b, size_t len);

#endif
