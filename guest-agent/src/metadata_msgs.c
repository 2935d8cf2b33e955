#include "metadata_msgs.h"

#include <string.h>

#include "messages.h"
#include "protocol.h"

/* METADATA: the pod's documents, or (with APP_NAME) one app's; the pieces append to what came before. */
static int load_documents(struct md_store *s, const struct frame *f, struct failure *err)
{
    struct kp_metadata m;
    if (kp_metadata_decode(&m, f->payload, f->len, err) < 0) /* APP_NAME at most once */
        return -1;
    const struct kp_strs *pod[MD_POD_DOCS] = {[MD_POD_MANIFEST] = &m.pod_manifest,
                                              [MD_POD_ANNOTATIONS] = &m.pod_annotations};
    const struct kp_strs *docs[MD_APP_DOCS] = {[MD_APP_IMAGE_ID] = &m.image_id,
                                               [MD_APP_IMAGE_MANIFEST] = &m.image_manifest,
                                               [MD_APP_ANNOTATIONS] = &m.app_annotations};
    struct md_app *app = NULL;
    int rc = 0;
    if (m.app_name && !(app = md_app_named(s, (const uint8_t *)m.app_name, strlen(m.app_name), err)))
        rc = -1;
    for (int i = 0; rc == 0 && i < MD_POD_DOCS; i++) {
        if (app && pod[i]->n)
            rc = failf(err, "protocol", 0, "METADATA: %s with APP_NAME", MD_POD_DOC_NAMES[i]);
        for (size_t j = 0; rc == 0 && j < pod[i]->n; j++)
            rc = md_doc_append(&s->pod[i], (const uint8_t *)pod[i]->v[j], strlen(pod[i]->v[j]), err);
    }
    for (int i = 0; rc == 0 && i < MD_APP_DOCS; i++) {
        if (!app && docs[i]->n)
            rc = failf(err, "protocol", 0, "METADATA: %s without APP_NAME", MD_APP_DOC_NAMES[i]);
        for (size_t j = 0; rc == 0 && j < docs[i]->n; j++)
            rc = md_doc_append(&app->docs[i], (const uint8_t *)docs[i]->v[j], strlen(docs[i]->v[j]), err);
    }
    kp_metadata_free(&m);
    return rc;
}

/* METADATA_START: the pod's identity, the secrets and the port; every field is required (protocol.toml). */
static int load_start(struct md_store *s, const struct frame *f, struct failure *err)
{
    struct kp_metadata_start m;
    if (kp_metadata_start_decode(&m, f->payload, f->len, err) < 0)
        return -1;
    size_t token_len = strlen(m.metadata_token), key_len = strlen(m.hmac_key);
    int rc = md_set_uuid(s, (const uint8_t *)m.pod_uuid, strlen(m.pod_uuid), err);
    if (rc == 0)
        rc = md_set_token(s, (const uint8_t *)m.metadata_token, token_len, err);
    if (rc == 0)
        rc = md_set_key_hex(s, (const uint8_t *)m.hmac_key, key_len, err);
    if (rc == 0)
        rc = md_set_port(s, m.metadata_port, err);
    explicit_bzero(m.metadata_token, token_len); /* the decoder's copies of the secrets */
    explicit_bzero(m.hmac_key, key_len);
    kp_metadata_start_free(&m);
    return rc < 0 ? -1 : md_start(s, err);
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
