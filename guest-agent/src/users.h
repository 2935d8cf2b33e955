/* USER and GROUP of a START, resolved inside the app's root (the caller has chrooted into it).
 *
 * As spec/aci.md says: a name found in the app's /etc/passwd or /etc/group; else a decimal number
 * is the id itself; else a value starting with "/" names a file in the app's rootfs whose owner
 * (user) or group (group) is the id; anything else fails. The files are parsed directly: a static
 * binary has no NSS, and the app's files are the ones that count, not the agent's. */
#ifndef KVMPOD_USERS_H
#define KVMPOD_USERS_H

#include <sys/types.h>

#include "util.h"

int resolve_user(const char *user, uid_t *uid, struct failure *f);   /* stage "user" */
int resolve_group(const char *group, gid_t *gid, struct failure *f); /* stage "group" */

#endif
