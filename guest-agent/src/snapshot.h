/* Boot snapshots (docs/snapshot.md): the agent's part in making one, and in becoming a pod's own
 * agent once a VM is restored from it. */
#ifndef KVMPOD_SNAPSHOT_H
#define KVMPOD_SNAPSHOT_H

#include "channel.h"

/* PREPARE: mounts the image disks it names (so the snapshot holds them mounted and their first
 * blocks cached), then answers PREPARED. Fatal (stage "mount") when a disk will not mount. */
void snapshot_prepare(const struct frame *f);

/* THAW: makes the restored VM this pod's own: hostname, a reseeded kernel random generator (every
 * clone of one snapshot starts with the same pool), the wall clock (the snapshot's is stale).
 * Fatal (stage "thaw") when the frame is malformed or a step fails. */
void snapshot_thaw(const struct frame *f);

#endif
