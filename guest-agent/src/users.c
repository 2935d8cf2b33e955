#include "users.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* A decimal id; (uint32_t)-1 is refused, it means "unchanged" to setuid/setgid. */
static bool parse_id(const char *s, uint32_t *id)
{
    uint64_t v = 0;
    if (!*s)
        return false;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return false;
        v = v * 10 + (uint64_t)(*s - '0');
        if (v >= UINT32_MAX)
            return false;
    }
    *id = (uint32_t)v;
    return true;
}

/* Looks `name` up in a passwd(5) or group(5) file: both keep the name in the first field and the
 * id in the third. Returns 0 when found, -1 with errno (ENOENT when the name is absent). */
static int lookup(const char *file, const char *name, uint32_t *id)
{
    FILE *fp = fopen(file, "re");
    if (!fp)
        return -1;
    char *line = NULL;
    size_t cap = 0;
    int found = -1;
    while (found < 0 && getline(&line, &cap, fp) > 0) {
        line[strcspn(line, "\n")] = '\0';
        char *pw = strchr(line, ':');
        if (!pw)
            continue;
        *pw++ = '\0';
        char *idfield = strchr(pw, ':');
        if (!idfield || strcmp(line, name) != 0)
            continue;
        idfield++;
        idfield[strcspn(idfield, ":")] = '\0';
        if (parse_id(idfield, id))
            found = 0;
    }
    free(line);
    fclose(fp);
    errno = ENOENT;
    return found;
}

/* spec/aci.md's order: a name in the app's own file, else a number, else "/path": the owner
 * (user) or group (group) of that file in the app's rootfs. */
static int resolve(const char *value, const char *file, const char *stage, uint32_t *id, struct failure *f)
{
    if (lookup(file, value, id) == 0)
        return 0;
    int lookup_err = errno;
    if (parse_id(value, id))
        return 0;
    if (value[0] == '/') {
        struct stat st;
        if (stat(value, &st) < 0)
            return failf(f, stage, errno, "%s %s: %s in the app's rootfs", stage, value, strerror(errno));
        *id = strcmp(stage, "user") == 0 ? (uint32_t)st.st_uid : (uint32_t)st.st_gid;
        return 0;
    }
    if (lookup_err == ENOENT)
        return failf(f, stage, 0, "unknown %s %s (not in the app's %s)", stage, value, file);
    return failf(f, stage, lookup_err, "unknown %s %s: cannot read the app's %s: %s", stage, value, file,
                 strerror(lookup_err));
}

int resolve_user(const char *user, uid_t *uid, struct failure *f)
{
    uint32_t id;
    if (resolve(user, "/etc/passwd", "user", &id, f) < 0)
        return -1;
    *uid = (uid_t)id;
    return 0;
}

int resolve_group(const char *group, gid_t *gid, struct failure *f)
{
    uint32_t id;
    if (resolve(group, "/etc/group", "group", &id, f) < 0)
        return -1;
    *gid = (gid_t)id;
    return 0;
}
