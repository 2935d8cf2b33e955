/* The appc metadata service (docs/metadata.md): a small HTTP/1.1 server on 127.0.0.1 inside the
 * agent's event loop, answering from the documents the host pushed at pod start (METADATA) and
 * signing with the pod's HMAC key (METADATA_START). No process, no host round trip. */
#ifndef KVMPOD_METADATA_H
#define KVMPOD_METADATA_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "channel.h"

#define METADATA_MAX_CONNS 16       /* connections served at once; more wait in the listen backlog */
#define METADATA_MAX_POLLFDS (METADATA_MAX_CONNS + 2) /* + the listener and the timer */
#define METADATA_REQUEST_MAX 65536  /* a request's head and body together */
#define METADATA_HEAD_MAX 8192      /* its request line and header fields */
#define METADATA_DOC_MAX 4194304    /* = protocol.toml's metadata_doc_max (tests/unit/test_metadata.py) */

/* METADATA (a piece of a document) and METADATA_START (listen and serve). A frame that breaks the
 * rules of docs/agent-protocol.md is fatal (stage "protocol"); failing to listen, too ("metadata"). */
void metadata_handle_frame(const struct frame *f);

/* Brings the loopback interface up (once; the service listens there). A boot snapshot does it in
 * PREPARE, so pods restored from it do not spend the time. Fatal (stage "metadata") on failure. */
void metadata_loopback_up(void);

/* Fills pfd with the fds the service waits on; returns how many. */
size_t metadata_pollfds(struct pollfd *pfd, size_t max);

/* Acts on the results of poll() for the fds metadata_pollfds() gave. */
void metadata_handle_events(const struct pollfd *pfd, size_t n);

/* --- the parts without sockets, also used by guest-agent/tests --- */

/* Takes a METADATA or METADATA_START frame into the store without listening; -1 (*err) if it is bad. */
int metadata_load(const struct frame *f, struct failure *err);

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
 * while more bytes are needed; true with *r filled once there is an answer: the request's, or an error. */
bool metadata_respond(const uint8_t *req, size_t len, bool eof, struct md_reply *r);

/* Writes the status line and header fields of *r to out (cap >= 256) and returns their length. */
size_t metadata_head(const struct md_reply *r, char *out, size_t cap);

#endif
