#include "sha512.h"

#include <string.h>

static const uint64_t K[80] = {
    0x428a2f98d728ae22, 0x7137449123ef65cd, 0xb5c0fbcfec4d3b2f, 0xe9b5dba58189dbbc, 0x3956c25bf348b538,
    0x59f111f1b605d019, 0x923f82a4af194f9b, 0xab1c5ed5da6d8118, 0xd807aa98a3030242, 0x12835b0145706fbe,
    0x243185be4ee4b28c, 0x550c7dc3d5ffb4e2, 0x72be5d74f27b896f, 0x80deb1fe3b1696b1, 0x9bdc06a725c71235,
    0xc19bf174cf692694, 0xe49b69c19ef14ad2, 0xefbe4786384f25e3, 0x0fc19dc68b8cd5b5, 0x240ca1cc77ac9c65,
    0x2de92c6f592b0275, 0x4a7484aa6ea6e483, 0x5cb0a9dcbd41fbd4, 0x76f988da831153b5, 0x983e5152ee66dfab,
    0xa831c66d2db43210, 0xb00327c898fb213f, 0xbf597fc7beef0ee4, 0xc6e00bf33da88fc2, 0xd5a79147930aa725,
    0x06ca6351e003826f, 0x142929670a0e6e70, 0x27b70a8546d22ffc, 0x2e1b21385c26c926, 0x4d2c6dfc5ac42aed,
    0x53380d139d95b3df, 0x650a73548baf63de, 0x766a0abb3c77b2a8, 0x81c2c92e47edaee6, 0x92722c851482353b,
    0xa2bfe8a14cf10364, 0xa81a664bbc423001, 0xc24b8b70d0f89791, 0xc76c51a30654be30, 0xd192e819d6ef5218,
    0xd69906245565a910, 0xf40e35855771202a, 0x106aa07032bbd1b8, 0x19a4c116b8d2d0c8, 0x1e376c085141ab53,
    0x2748774cdf8eeb99, 0x34b0bcb5e19b48a8, 0x391c0cb3c5c95a63, 0x4ed8aa4ae3418acb, 0x5b9cca4f7763e373,
    0x682e6ff3d6b2b8a3, 0x748f82ee5defb2fc, 0x78a5636f43172f60, 0x84c87814a1f0ab72, 0x8cc702081a6439ec,
    0x90befffa23631e28, 0xa4506cebde82bde9, 0xbef9a3f7b2c67915, 0xc67178f2e372532b, 0xca273eceea26619c,
    0xd186b8c721c0c207, 0xeada7dd6cde0eb1e, 0xf57d4f7fee6ed178, 0x06f067aa72176fba, 0x0a637dc5a2c898a6,
    0x113f9804bef90dae, 0x1b710b35131c471b, 0x28db77f523047d84, 0x32caab7b40c72493, 0x3c9ebe0a15c9bebc,
    0x431d67c49c100d4c, 0x4cc5d4becb3e42b6, 0x597f299cfc657e2a, 0x5fcb6fab3ad6faec, 0x6c44198c4a475817,
};

static inline uint64_t ror(uint64_t x, unsigned n)
{
    return x >> n | x << (64 - n);
}

static uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static void compress(uint64_t h[8], const uint8_t block[SHA512_BLOCK_LEN])
{
    uint64_t w[80], s[8];
    for (int t = 0; t < 16; t++)
        w[t] = be64(block + 8 * t);
    for (int t = 16; t < 80; t++) {
        uint64_t s0 = ror(w[t - 15], 1) ^ ror(w[t - 15], 8) ^ (w[t - 15] >> 7);
        uint64_t s1 = ror(w[t - 2], 19) ^ ror(w[t - 2], 61) ^ (w[t - 2] >> 6);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    memcpy(s, h, sizeof s);
    for (int t = 0; t < 80; t++) {
        uint64_t e = s[4], a = s[0];
        uint64_t t1 = s[7] + (ror(e, 14) ^ ror(e, 18) ^ ror(e, 41)) + ((e & s[5]) ^ (~e & s[6])) + K[t] + w[t];
        uint64_t t2 = (ror(a, 28) ^ ror(a, 34) ^ ror(a, 39)) + ((a & s[1]) ^ (a & s[2]) ^ (s[1] & s[2]));
        memmove(s + 1, s, 7 * sizeof s[0]);
        s[4] += t1;
        s[0] = t1 + t2;
    }
    for (int i = 0; i < 8; i++)
        h[i] += s[i];
}

void sha512_init(struct sha512 *c)
{
    static const uint64_t IV[8] = {0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b,
                                   0xa54ff53a5f1d36f1, 0x510e527fade682d1, 0x9b05688c2b3e6c1f,
                                   0x1f83d9abfb41bd6b, 0x5be0cd19137e2179};
    memcpy(c->h, IV, sizeof c->h);
    c->used = 0;
    c->total = 0;
}

void sha512_update(struct sha512 *c, const void *data, size_t len)
{
    const uint8_t *p = data;
    c->total += len;
    while (len) {
        size_t n = SHA512_BLOCK_LEN - c->used;
        if (n > len)
            n = len;
        memcpy(c->block + c->used, p, n);
        c->used += n;
        p += n;
        len -= n;
        if (c->used == SHA512_BLOCK_LEN) {
            compress(c->h, c->block);
            c->used = 0;
        }
    }
}

void sha512_final(struct sha512 *c, uint8_t out[SHA512_DIGEST_LEN])
{
    /* Padding: 0x80, zeros, then the message length in bits as a 128-bit big-endian number. */
    uint64_t bits_hi = c->total >> 61, bits_lo = c->total << 3;
    c->block[c->used++] = 0x80;
    if (c->used > SHA512_BLOCK_LEN - 16) {
        memset(c->block + c->used, 0, SHA512_BLOCK_LEN - c->used);
        compress(c->h, c->block);
        c->used = 0;
    }
    memset(c->block + c->used, 0, SHA512_BLOCK_LEN - 16 - c->used);
    put_be64(c->block + SHA512_BLOCK_LEN - 16, bits_hi);
    put_be64(c->block + SHA512_BLOCK_LEN - 8, bits_lo);
    compress(c->h, c->block);
    for (int i = 0; i < 8; i++)
        put_be64(out + 8 * i, c->h[i]);
    explicit_bzero(c, sizeof *c); /* the state of an HMAC is key material */
}

void hmac_sha512_init(struct hmac_sha512 *h, const void *key, size_t key_len)
{
    uint8_t k[SHA512_BLOCK_LEN] = {0}, pad[SHA512_BLOCK_LEN];
    if (key_len > SHA512_BLOCK_LEN) {
        sha512_init(&h->inner);
        sha512_update(&h->inner, key, key_len);
        sha512_final(&h->inner, k);
    } else {
        memcpy(k, key, key_len);
    }
    for (int i = 0; i < SHA512_BLOCK_LEN; i++)
        pad[i] = k[i] ^ 0x36;
    sha512_init(&h->inner);
    sha512_update(&h->inner, pad, sizeof pad);
    for (int i = 0; i < SHA512_BLOCK_LEN; i++)
        pad[i] = k[i] ^ 0x5c;
    sha512_init(&h->outer);
    sha512_update(&h->outer, pad, sizeof pad);
    explicit_bzero(k, sizeof k);
    explicit_bzero(pad, sizeof pad);
}

void hmac_sha512_update(struct hmac_sha512 *h, const void *data, size_t len)
{
    sha512_update(&h->inner, data, len);
}

void hmac_sha512_final(struct hmac_sha512 *h, uint8_t out[SHA512_DIGEST_LEN])
{
    uint8_t inner[SHA512_DIGEST_LEN];
    sha512_final(&h->inner, inner);
    sha512_update(&h->outer, inner, sizeof inner);
    sha512_final(&h->outer, out);
    explicit_bzero(inner, sizeof inner);
}

bool equal_ct(const void *a, const void *b, size_t len)
{
    const volatile uint8_t *x = a, *y = b;
    uint8_t diff = 0;
    for (size_t i = 0; i < len; i++)
        diff |= x[i] ^ y[i];
    return diff == 0;
}
