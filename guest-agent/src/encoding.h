/* The text encodings of the metadata service: hex digits, %-escapes (paths and forms), base64. */
#ifndef KVMPOD_ENCODING_H
#define KVMPOD_ENCODING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* 0..15 for a hex digit of either case, else -1. */
int hex_value(uint8_t c);

/* %XX escapes, and '+' as a space when `plus` (forms). Returns 0, -1 for a bad escape, -2 when out is too
 * small. */
int url_decode(const uint8_t *in, size_t len, bool plus, uint8_t *out, size_t cap, size_t *out_len);

/* Standard base64 with padding (RFC 4648 section 4); out holds 4 * ceil(len / 3) characters. Returns their
 * number. */
size_t base64_encode(const uint8_t *in, size_t len, char *out);

/* The inverse, strictly: padded, no whitespace. Returns 0, or -1 if `in` is not base64 or too long. */
int base64_decode(const uint8_t *in, size_t len, uint8_t *out, size_t cap, size_t *out_len);

#endif
