#include "encoding.h"

#include <string.h>

int hex_value(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

int url_decode(const uint8_t *in, size_t len, bool plus, uint8_t *out, size_t cap, size_t *out_len)
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

size_t base64_encode(const uint8_t *in, size_t len, char *out)
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

int base64_decode(const uint8_t *in, size_t len, uint8_t *out, size_t cap, size_t *out_len)
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
