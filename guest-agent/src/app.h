/* App roots: the read-only image disk of an app under a tmpfs-backed overlay (or a host directory
 * shared over virtio-fs, used in place), given the
 * filesystems an appc executor provides (spec/ace.md, "Filesystem Setup") and an /etc/hosts
 * when the image has none, then left writable or made read-only. */
#ifndef KVMPOD_APP_H
#define KVMPOD_APP_H

#include <stdbool.h>
#include <stddef.h>

#include "util.h"

/* The root directory for a process of app `name` running from the disk with serial `serial`.
 * The first START naming an app builds it, with the pod volumes `mounts` (VOLUME_MOUNT values,
 * docs/volumes.md) bind-mounted in it; later ones reuse it. Returns NULL with *f filled:
 * stage "request" (bad name), "mount" (the image disk), "rootfs" (the app root) or "volume". */
struct app_root_req {
    const char *name, *serial;
    const char *share_tag; /* non-NULL: the root is this virtio-fs share, used in place (serial == tag) */
    bool readonly;
    bool keep_etc;         /* no executor /etc/hosts or resolv.conf (START_FLAG_KEEP_ETC) */
    char *const *mounts;
    size_t nmounts;
};
const char *app_prepare(const struct app_root_req *req, struct failure *f);

/* The root an earlier START made for app `name` (START_FLAG_ENTER: enter it, never make it).
 * Returns NULL with *f (stage "request") when there is no such app or it runs from another disk. */
const char *app_existing_root(const char *name, const char *serial, struct failure *f);

/* Mounts the image disk with virtio-blk serial `serial` read-only (once; later calls return the same
 * path) and returns where. NULL with *f (stage "mount") when there is no such disk or it will not mount. */
const char *image_mount(const char *serial, struct failure *f);

/* For a boot snapshot: mounts the image disk `serial` and builds a spare writable app root on it
 * (the overlay and the appc filesystem set, nothing that depends on the app or the pod), which the
 * first START of a writable app on that disk without volumes moves into place instead of building
 * its own. 0, or -1 with *f. */
int app_prebuild(const char *serial, struct failure *f);

/* Unmounts everything app_prepare() mounted, newest first; best effort, for shutdown. */
void app_unmount_all(void);

#endif
