/* The endpoints of the appc metadata API (spec/ace.md, "App Container Metadata Service"; docs/metadata.md):
 * a parsed request and the store in, an answer out. No sockets. */
#ifndef KVMPOD_METADATA_API_H
#define KVMPOD_METADATA_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "metadata_store.h"

struct md_reply {
    int status;
    const char *type;  /* Content-Type */
    const char *allow; /* the Allow field of a 405, else NULL */
    const uint8_t *body;
    size_t body_len;
    bool head;         /* a HEAD request: the same fields, no body */
    char what[96];     /* for the debug log: the method and the path after the token, never the token */
    uint8_t text[96];  /* storage of short bodies: a signature, an error line */
};

/* Looks at the `len` bytes of a request received so far (eof: the client sends no more). Returns false
 * while more bytes are needed; true with *r filled once there is an answer: the request's, or an error.
 * The body may point into the store or into *r. */
bool metadata_respond(const struct md_store *s, const uint8_t *req, size_t len, bool eof, struct md_reply *r);

/* An error answer: `STATUS REASON` as one line of text. */
void metadata_reply_error(struct md_reply *r, int status);

/* Writes the status line and header fields of *r to out (cap >= 256) and returns their length. */
size_t metadata_head(const struct md_reply *r, char *out, size_t cap);

#endif
