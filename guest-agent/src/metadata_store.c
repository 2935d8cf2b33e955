#include "metadata_store.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "encoding.h"
#include "metadata.h"

const char *const MD_POD_DOC_NAMES[MD_POD_DOCS] = {"POD_MANIFEST", "POD_ANNOTATIONS"};
const char *const MD_APP_DOC_NAMES[MD_APP_DOCS] = {"IMAGE_ID", "IMAGE_MANIFEST", "APP_ANNOTATIONS"};

int md_doc_append(struct md_doc *d, const uint8_t *piece, size_t len, struct failure *err)
{
    if (len > METADATA_DOC_MAX - d->len)
        return failf(err, "protocol", 0, "a metadata document exceeds %u bytes", METADATA_DOC_MAX);
    if (len) {
        uint8_t *grown = realloc(d->data, d->len + len);
        if (!grown)
            return failf(err, "metadata", ENOMEM, "out of memory for the metadata documents");
        memcpy(grown + d->len, piece, len);
        d->data = grown;
        d->len += len;
    }
    d->present = true;
    return 0;
}

/* An app name is one path segment of printable ASCII (AC Names are [a-z0-9-]). */
static bool valid_app_name(const uint8_t *s, size_t len)
{
    if (len == 0 || len > MD_APP_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (s[i] <= ' ' || s[i] >= 0x7f || s[i] == '/')
            return false;
    return true;
}

const struct md_app *md_find_app(const struct md_store *s, const char *name, size_t len)
{
    for (size_t i = 0; i < s->n_apps; i++)
        if (strlen(s->apps[i].name) == len && memcmp(s->apps[i].name, name, len) == 0)
            return &s->apps[i];
    return NULL;
}

struct md_app *md_app_named(struct md_store *s, const uint8_t *name, size_t len, struct failure *err)
{
    if (!valid_app_name(name, len)) {
        failf(err, "protocol", 0, "METADATA: APP_NAME is not a valid app name");
        return NULL;
    }
    const struct md_app *known = md_find_app(s, (const char *)name, len);
    if (known)
        return &s->apps[known - s->apps];
    if (s->n_apps == MD_MAX_APPS) {
        failf(err, "protocol", 0, "METADATA: more than %u apps", MD_MAX_APPS);
        return NULL;
    }
    struct md_app *a = &s->apps[s->n_apps++];
    memcpy(a->name, name, len);
    a->name[len] = '\0';
    return a;
}

int md_parse_uuid(const uint8_t *text, size_t len, uint8_t out[16])
{
    if (len != MD_UUID_TEXT_LEN)
        return -1;
    for (size_t i = 0, n = 0; i < len; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (text[i] != '-')
                return -1;
            continue;
        }
        int hi = hex_value(text[i]), lo = i + 1 < len ? hex_value(text[i + 1]) : -1;
        if (hi < 0 || lo < 0)
            return -1;
        out[n++] = (uint8_t)(hi << 4 | lo);
        i++;
    }
    return 0;
}

int md_set_uuid(struct md_store *s, const uint8_t *text, size_t len, struct failure *err)
{
    if (md_parse_uuid(text, len, s->uuid) < 0)
        return failf(err, "protocol", 0, "POD_UUID is not a UUID");
    return 0;
}

int md_set_token(struct md_store *s, const uint8_t *token, size_t len, struct failure *err)
{
    if (len < MD_TOKEN_MIN || len > MD_TOKEN_MAX)
        return failf(err, "protocol", 0, "METADATA_TOKEN must have %u to %u characters", MD_TOKEN_MIN,
                     MD_TOKEN_MAX);
    for (size_t i = 0; i < len; i++) {
        uint8_t c = token[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
            return failf(err, "protocol", 0, "METADATA_TOKEN has a character outside [A-Za-z0-9_-]");
    }
    memcpy(s->token, token, len);
    s->token[len] = '\0';
    s->token_len = len;
    return 0;
}

int md_set_key_hex(struct md_store *s, const uint8_t *hex, size_t len, struct failure *err)
{
    if (len % 2 || len / 2 < MD_KEY_MIN || len / 2 > MD_KEY_MAX)
        return failf(err, "protocol", 0, "HMAC_KEY must be %u to %u bytes in hex", MD_KEY_MIN, MD_KEY_MAX);
    for (size_t i = 0; i < len; i += 2) {
        int hi = hex_value(hex[i]), lo = hex_value(hex[i + 1]);
        if (hi < 0 || lo < 0)
            return failf(err, "protocol", 0, "HMAC_KEY is not hex");
        s->key[i / 2] = (uint8_t)(hi << 4 | lo);
    }
    s->key_len = len / 2;
    return 0;
}

int md_set_port(struct md_store *s, uint32_t port, struct failure *err)
{
    if (port == 0 || port > 65535)
        return failf(err, "protocol", 0, "METADATA_PORT %u is not a TCP port", port);
    s->port = (uint16_t)port;
    return 0;
}

/* Every document the service serves must be there: the host sends them all before METADATA_START. */
static int check_complete(const struct md_store *s, struct failure *err)
{
    for (int i = 0; i < MD_POD_DOCS; i++)
        if (!s->pod[i].present)
            return failf(err, "protocol", 0, "METADATA_START before %s", MD_POD_DOC_NAMES[i]);
    for (size_t a = 0; a < s->n_apps; a++)
        for (int i = 0; i < MD_APP_DOCS; i++)
            if (!s->apps[a].docs[i].present)
                return failf(err, "protocol", 0, "METADATA_START before %s of app %s", MD_APP_DOC_NAMES[i],
                             s->apps[a].name);
    return 0;
}

int md_start(struct md_store *s, struct failure *err)
{
    if (check_complete(s, err) < 0)
        return -1;
    /* Served in canonical (lower-case) form, whatever the case it came in. */
    static const char HEX[] = "0123456789abcdef";
    for (size_t i = 0, n = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            s->uuid_text[n++] = '-';
        s->uuid_text[n++] = HEX[s->uuid[i] >> 4];
        s->uuid_text[n++] = HEX[s->uuid[i] & 15];
    }
    s->started = true;
    return 0;
}

static void doc_free(struct md_doc *d)
{
    free(d->data);
    *d = (struct md_doc){0};
}

void md_drop_documents(struct md_store *s)
{
    for (int i = 0; i < MD_POD_DOCS; i++)
        doc_free(&s->pod[i]);
    for (size_t a = 0; a < s->n_apps; a++)
        for (int i = 0; i < MD_APP_DOCS; i++)
            doc_free(&s->apps[a].docs[i]);
    s->n_apps = 0;
}
