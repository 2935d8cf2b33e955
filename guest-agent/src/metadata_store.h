/* The metadata service's document store: what the host pushed in METADATA and METADATA_START
 * (docs/metadata.md), checked as it comes in and final once started. PID 1 fills one to check the
 * host's frames; the service process fills its own from the same frames and serves from it. */
#ifndef KVMPOD_METADATA_STORE_H
#define KVMPOD_METADATA_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "protocol.h"
#include "util.h"

#define MD_TOKEN_MIN 16
#define MD_TOKEN_MAX 128
#define MD_KEY_MIN 64
#define MD_KEY_MAX 128
#define MD_APP_NAME_MAX 255
#define MD_MAX_APPS KP_MAX_STREAMS /* every app runs on a stream of its own */
#define MD_UUID_TEXT_LEN 36

struct md_doc {
    uint8_t *data;
    size_t len;
    bool present;
};

enum md_pod_doc { MD_POD_MANIFEST, MD_POD_ANNOTATIONS, MD_POD_DOCS };
enum md_app_doc { MD_APP_IMAGE_ID, MD_APP_IMAGE_MANIFEST, MD_APP_ANNOTATIONS, MD_APP_DOCS };

extern const char *const MD_POD_DOC_NAMES[MD_POD_DOCS]; /* the protocol's field names, for errors */
extern const char *const MD_APP_DOC_NAMES[MD_APP_DOCS];

struct md_app {
    char name[MD_APP_NAME_MAX + 1];
    struct md_doc docs[MD_APP_DOCS];
};

struct md_store {
    bool started;
    uint8_t uuid[16];
    char uuid_text[MD_UUID_TEXT_LEN + 1]; /* canonical (lower-case), set when started */
    char token[MD_TOKEN_MAX + 1];
    size_t token_len;
    uint8_t key[MD_KEY_MAX];
    size_t key_len;
    uint16_t port;
    struct md_doc pod[MD_POD_DOCS];
    struct md_app apps[MD_MAX_APPS];
    size_t n_apps;
};

/* Each returns 0, or -1 with *err (stage "protocol": the value breaks docs/agent-protocol.md's rules;
 * "metadata": out of memory). */

/* Appends a piece of a document (documents come in pieces; the total is capped at METADATA_DOC_MAX). */
int md_doc_append(struct md_doc *d, const uint8_t *piece, size_t len, struct failure *err);

/* The app of that name, added if new (a name is one path segment of printable ASCII). NULL on error. */
struct md_app *md_app_named(struct md_store *s, const uint8_t *name, size_t len, struct failure *err);

/* The app of that name, or NULL. */
const struct md_app *md_find_app(const struct md_store *s, const char *name, size_t len);

/* Canonical UUID text (8-4-4-4-12 hex digits, either case) to its 16 bytes; -1 if it is not one. */
int md_parse_uuid(const uint8_t *text, size_t len, uint8_t out[16]);

int md_set_uuid(struct md_store *s, const uint8_t *text, size_t len, struct failure *err);
int md_set_token(struct md_store *s, const uint8_t *token, size_t len, struct failure *err);
int md_set_key_hex(struct md_store *s, const uint8_t *hex, size_t len, struct failure *err);
int md_set_port(struct md_store *s, uint32_t port, struct failure *err);

/* Every document is there: the store is final. */
int md_start(struct md_store *s, struct failure *err);

/* Frees the documents; the store keeps being `started` (or not). */
void md_drop_documents(struct md_store *s);

#endif
