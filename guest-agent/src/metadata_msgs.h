/* The host's METADATA and METADATA_START messages (docs/agent-protocol.md) decoded into a store: the one
 * place their fields are read, by PID 1 (to check them) and by the service process (to serve them). */
#ifndef KVMPOD_METADATA_MSGS_H
#define KVMPOD_METADATA_MSGS_H

#include "channel.h"
#include "metadata_store.h"

/* Takes a METADATA or METADATA_START frame into `s`; -1 (*err, stage "protocol" for a frame that breaks
 * the protocol's rules) if it is bad. */
int metadata_msgs_load(struct md_store *s, const struct frame *f, struct failure *err);

#endif
