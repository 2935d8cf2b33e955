#include "caps.h"

#include <errno.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Linux capability numbers (linux/capability.h; they never change once assigned). */
static const char *const CAP_NAMES[] = {
    "CAP_CHOWN",           "CAP_DAC_OVERRIDE",  "CAP_DAC_READ_SEARCH", "CAP_FOWNER",       "CAP_FSETID",
    "CAP_KILL",            "CAP_SETGID",        "CAP_SETUID",          "CAP_SETPCAP",      "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN",       "CAP_NET_RAW",      "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",       "CAP_SYS_MODULE",    "CAP_SYS_RAWIO",       "CAP_SYS_CHROOT",   "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",       "CAP_SYS_ADMIN",     "CAP_SYS_BOOT",        "CAP_SYS_NICE",     "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",        "CAP_SYS_TTY_CONFIG", "CAP_MKNOD",          "CAP_LEASE",        "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",   "CAP_SETFCAP",       "CAP_MAC_OVERRIDE",    "CAP_MAC_ADMIN",    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",      "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",      "CAP_PERFMON",      "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
};

#define BIT(n) ((uint64_t)1 << (n))
#define CAP_SYS_ADMIN_NR 21

/* spec/ace.md's default set: the 14 capabilities an app has when no capability isolator is given. */
static const uint64_t DEFAULT_SET = BIT(0) /* CHOWN */ | BIT(1) /* DAC_OVERRIDE */ | BIT(3) /* FOWNER */ |
                                    BIT(4) /* FSETID */ | BIT(5) /* KILL */ | BIT(6) /* SETGID */ |
                                    BIT(7) /* SETUID */ | BIT(8) /* SETPCAP */ | BIT(10) /* NET_BIND_SERVICE */ |
                                    BIT(13) /* NET_RAW */ | BIT(18) /* SYS_CHROOT */ | BIT(27) /* MKNOD */ |
                                    BIT(29) /* AUDIT_WRITE */ | BIT(31) /* SETFCAP */;

static int names_to_set(char *const *names, const char *isolator, uint64_t *set, struct failure *f)
{
    for (; *names; names++) {
        size_t i = 0;
        while (i < ARRAY_LEN(CAP_NAMES) && strcmp(CAP_NAMES[i], *names) != 0)
            i++;
        if (i == ARRAY_LEN(CAP_NAMES))
            return failf(f, "capabilities", EINVAL, "%s: unknown capability %s", isolator, *names);
        *set |= BIT(i);
    }
    return 0;
}

int caps_bounding_set(char *const *retain, char *const *remove, uint64_t *set, struct failure *f)
{
    uint64_t removed = 0;
    if (retain) {
        *set = 0;
        return names_to_set(retain, "os/linux/capabilities-retain-set", set, f);
    }
    if (remove && names_to_set(remove, "os/linux/capabilities-remove-set", &removed, f) < 0)
        return -1;
    *set = DEFAULT_SET & ~removed;
    return 0;
}

/* capget/capset with the 64-bit (version 3) layout; libc does not wrap them everywhere. */
struct cap_header {
    uint32_t version;
    int pid;
};
struct cap_data {
    uint32_t effective, permitted, inheritable;
};
#define CAP_VERSION_3 0x20080522u

static int cap_get(struct cap_data d[2])
{
    struct cap_header h = {CAP_VERSION_3, 0};
    return (int)syscall(SYS_capget, &h, d);
}

static int cap_set(uint64_t effective, uint64_t permitted, uint64_t inheritable)
{
    struct cap_header h = {CAP_VERSION_3, 0};
    struct cap_data d[2];
    for (int i = 0; i < 2; i++)
        d[i] = (struct cap_data){(uint32_t)(effective >> 32 * i), (uint32_t)(permitted >> 32 * i),
                                 (uint32_t)(inheritable >> 32 * i)};
    return (int)syscall(SYS_capset, &h, d);
}

int caps_prepare(uint64_t set, uid_t uid, bool keep_sys_admin, struct failure *f)
{
    /* PR_CAPBSET_READ fails (EINVAL) past the kernel's last capability: that ends the loop. */
    for (int cap = 0; cap < 64 && prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
        if (!(set & BIT(cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            return failf(f, "capabilities", errno, "drop capability %d from the bounding set: %s", cap,
                         strerror(errno));
    if (uid != 0 && keep_sys_admin && prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
        return failf(f, "capabilities", errno, "PR_SET_KEEPCAPS: %s", strerror(errno));
    return 0;
}

int caps_finish(uint64_t set, uid_t uid, bool keep_sys_admin, struct failure *f)
{
    int rc;
    if (uid == 0) {
        /* Root keeps what it has until exec, which gives it exactly the bounding set. */
        struct cap_data d[2];
        if ((rc = cap_get(d)) == 0) {
            uint64_t eff = d[0].effective | (uint64_t)d[1].effective << 32;
            uint64_t perm = d[0].permitted | (uint64_t)d[1].permitted << 32;
            rc = cap_set(eff, perm, set & perm);
        }
    } else {
        uint64_t admin = keep_sys_admin ? BIT(CAP_SYS_ADMIN_NR) : 0;
        rc = cap_set(admin, admin, 0);
    }
    if (rc < 0)
        return failf(f, "capabilities", errno, "capset: %s", strerror(errno));
    /* No ambient capabilities (EINVAL: a kernel before 4.3 has none to clear). */
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        return failf(f, "capabilities", errno, "clear the ambient set: %s", strerror(errno));
    return 0;
}
