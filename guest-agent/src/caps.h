/* Capabilities of an app's processes: os/linux/capabilities-retain-set and -remove-set
 * (spec/ace.md), and the appc default bounding set when neither is given. */
#ifndef KVMPOD_CAPS_H
#define KVMPOD_CAPS_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "util.h"

/* The bounding set (bit n = capability n) for a retain set (exactly those), a remove set (the
 * default set without those) or neither (both NULL: the default set). Names are CAP_*; an unknown
 * name fails (stage "capabilities"). Runs in the agent, at START. */
int caps_bounding_set(char *const *retain, char *const *remove, uint64_t *set, struct failure *f);

/* In the child, before it changes its user: drops every capability outside `set` from the
 * bounding set, and (for a non-root `uid`) keeps the permitted set across setuid so that
 * caps_finish() can still install a seccomp filter. */
int caps_prepare(uint64_t set, uid_t uid, bool keep_sys_admin, struct failure *f);

/* In the child, after setuid: root gets `set` as its inheritable set (exec then makes the
 * permitted and effective sets `set` too: the bounding set caps them); anyone else gets empty
 * inheritable, permitted and effective sets, but CAP_SYS_ADMIN until exec if `keep_sys_admin`
 * (to install the seccomp filter; exec drops it). The ambient set is cleared. */
int caps_finish(uint64_t set, uid_t uid, bool keep_sys_admin, struct failure *f);

#endif
