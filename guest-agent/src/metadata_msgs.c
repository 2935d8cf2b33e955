#include "metadata_msgs.h"

#include "protocol.h"
#include "tlv.h"

static int pod_doc_index(uint16_t tag)
{
    return tag == KP_F_POD_MANIFEST ? MD_POD_MANIFEST : tag == KP_F_POD_ANNOTATIONS ? MD_POD_ANNOTATIONS : -1;
}

static int app_doc_index(uint16_t tag)
{
    switch (tag) {
    case KP_F_IMAGE_ID:
        return MD_APP_IMAGE_ID;
    case KP_F_IMAGE_MANIFEST:
        return MD_APP_IMAGE_MANIFEST;
    case KP_F_APP_ANNOTATIONS:
        return MD_APP_ANNOTATIONS;
    default:
        return -1;
    }
}

/* METADATA: pod documents first, then (optionally) APP_NAME and that app's documents. */
static int load_documents(struct md_store *s, const struct frame *f, struct failure *err)
{
    struct tlv_reader rd;
    struct tlv_field fl;
    struct md_app *app = NULL;
    int more, i;
    tlv_reader_init(&rd, f->payload, f->len);
    while ((more = tlv_next(&rd, &fl, err)) > 0) {
        if (fl.tag == KP_F_APP_NAME) {
            if (app)
                return failf(err, "protocol", 0, "METADATA names two apps");
            if (!(app = md_app_named(s, fl.value, fl.len, err)))
                return -1;
        } else if ((i = pod_doc_index(fl.tag)) >= 0) {
            if (app)
                return failf(err, "protocol", 0, "METADATA: %s after APP_NAME", MD_POD_DOC_NAMES[i]);
            if (md_doc_append(&s->pod[i], fl.value, fl.len, err) < 0)
                return -1;
        } else if ((i = app_doc_index(fl.tag)) >= 0) {
            if (!app)
                return failf(err, "protocol", 0, "METADATA: %s without APP_NAME", MD_APP_DOC_NAMES[i]);
            if (md_doc_append(&app->docs[i], fl.value, fl.len, err) < 0)
                return -1;
        }
    }
    return more;
}

/* METADATA_START: the pod's identity, the secrets and the port; every field is required. */
static int load_start(struct md_store *s, const struct frame *f, struct failure *err)
{
    static const char *const NEEDED[] = {"POD_UUID", "METADATA_TOKEN", "HMAC_KEY", "METADATA_PORT"};
    struct tlv_reader rd;
    struct tlv_field fl;
    unsigned have = 0;
    int more = 0, rc = 0;
    tlv_reader_init(&rd, f->payload, f->len);
    while (rc == 0 && (more = tlv_next(&rd, &fl, err)) > 0) {
        switch (fl.tag) {
        case KP_F_POD_UUID:
            rc = md_set_uuid(s, fl.value, fl.len, err);
            have |= 1;
            break;
        case KP_F_METADATA_TOKEN:
            rc = md_set_token(s, fl.value, fl.len, err);
            have |= 2;
            break;
        case KP_F_HMAC_KEY:
            rc = md_set_key_hex(s, fl.value, fl.len, err);
            have |= 4;
            break;
        case KP_F_METADATA_PORT:
            rc = md_set_port(s, tlv_u32(&fl), err);
            have |= 8;
            break;
        }
    }
    if (rc < 0 || more < 0)
        return -1;
    for (unsigned i = 0; i < ARRAY_LEN(NEEDED); i++)
        if (!(have & 1u << i))
            return failf(err, "protocol", 0, "METADATA_START lacks %s", NEEDED[i]);
    return md_start(s, err);
}

int metadata_msgs_load(struct md_store *s, const struct frame *f, struct failure *err)
{
    if (s->started)
        return failf(err, "protocol", 0, "%s after METADATA_START", message_name(f->type));
    if (f->type == KP_MSG_METADATA)
        return load_documents(s, f, err);
    if (f->type == KP_MSG_METADATA_START)
        return load_start(s, f, err);
    return failf(err, "protocol", 0, "%s is not a metadata message", message_name(f->type));
}
