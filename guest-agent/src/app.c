#include "app.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "log.h"
#include "net.h"

#define KVMPOD_RUN "/run/kvmpod"
#define IMAGES_DIR KVMPOD_RUN "/images"
#define APPS_DIR KVMPOD_RUN "/apps"
#define VOLUMES_DIR KVMPOD_RUN "/volumes"
#define SPARES_DIR KVMPOD_RUN "/spare"
/* The disks are there before the agent starts serving (virtio_blk probes when it loads); the
 * wait only covers a slow probe. */
#define DISK_TIMEOUT_MS 5000u

struct image {
    struct image *next;
    char *serial;
    char path[PATH_MAX];
};

struct app {
    struct app *next;
    char *name, *serial;
    char root[PATH_MAX];
};

/* A pod volume, mounted once at VOLUMES_DIR/<name> by the first app that mounts it; every app's
 * mount is a bind mount of it, so all apps see one filesystem (docs/volumes.md). */
struct volume {
    struct volume *next;
    char *name, *kind, *options;
    size_t mount_index; /* its place in mounts[]: undone with the app setup that made it */
    char path[PATH_MAX];
};

/* A spare app root (see app_prebuild): an image's overlay and the appc filesystem set, made while a
 * boot snapshot is prepared; the first writable app on that image without volumes takes it. */
struct spare {
    struct spare *next;
    char *serial;
    size_t first_mount, nmounts; /* its entries in mounts[] */
    bool made_hosts;             /* it has the executor's /etc/hosts (the image has none) */
    char base[PATH_MAX];
};

static struct image *images;
static struct app *apps;
static struct volume *volumes;
static struct spare *spares;

/* Every mount made, in order, so a failed setup and shutdown can undo them newest first. */
static char **mounts;
static size_t nmounts, mounts_cap;

static int mount_at(const char *src, const char *target, const char *type, unsigned long flags, const char *data,
                    const char *stage, struct failure *f)
{
    if (nmounts == mounts_cap) {
        size_t cap = mounts_cap ? 2 * mounts_cap : 32;
        char **grown = realloc(mounts, cap * sizeof *grown);
        if (!grown)
            return failf(f, stage, ENOMEM, "out of memory");
        mounts = grown;
        mounts_cap = cap;
    }
    char *copy = strdup(target);
    if (!copy)
        return failf(f, stage, ENOMEM, "out of memory");
    if (mount(src, target, type, flags, data) < 0) {
        int e = errno;
        free(copy);
        return failf(f, stage, e, "mount %s on %s: %s", type ? type : src, target, strerror(e));
    }
    mounts[nmounts++] = copy;
    log_debug("mounted %s on %s", type ? type : src, target);
    return 0;
}

static void unmount_to(size_t depth)
{
    while (nmounts > depth) {
        char *target = mounts[--nmounts];
        if (target && umount2(target, 0) < 0) /* NULL: already gone with a subtree (forget_mounts) */
            umount2(target, MNT_DETACH);
        free(target);
    }
}

/* Entries [first, first + n) were unmounted together (with their parent, MNT_DETACH): keep their
 * slots, so the indexes of later mounts stay valid. */
static void forget_mounts(size_t first, size_t n)
{
    for (size_t i = first; i < first + n; i++) {
        free(mounts[i]);
        mounts[i] = NULL;
    }
}

/* The mounts moved (MS_MOVE) from `from` to `to`: their recorded paths follow. 0, or -1 on ENOMEM. */
static int rebase_mounts(size_t first, size_t n, const char *from, const char *to)
{
    size_t len = strlen(from);
    for (size_t i = first; i < first + n; i++) {
        const char *rest = mounts[i] + len;
        char *moved = malloc(strlen(to) + strlen(rest) + 1);
        if (!moved)
            return -1;
        strcpy(moved, to);
        strcat(moved, rest);
        free(mounts[i]);
        mounts[i] = moved;
    }
    return 0;
}

void app_unmount_all(void)
{
    unmount_to(0);
}

/* Names become path components (and overlay options, where ',' and ':' are separators). */
static bool safe_name(const char *s)
{
    if (!*s || *s == '.' || strlen(s) > NAME_MAX)
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '-' ||
              *s == '_' || *s == '.'))
            return false;
    return true;
}

static int make_dir_or_fail(const char *path, const char *stage, struct failure *f)
{
    if (make_dir(path, 0755) < 0)
        return failf(f, stage, errno, "mkdir %s: %s", path, strerror(errno));
    return 0;
}

const char *image_mount(const char *serial, struct failure *f)
{
    for (struct image *i = images; i; i = i->next)
        if (strcmp(i->serial, serial) == 0)
            return i->path;

    char dev[PATH_MAX];
    if (!sysfs_wait_for_dev("/sys/block", "serial", serial, DISK_TIMEOUT_MS, dev, sizeof dev)) {
        failf(f, "mount", ENOENT, "no disk with serial %s", serial);
        return NULL;
    }
    struct image *img = calloc(1, sizeof *img);
    if (!img || !(img->serial = strdup(serial))) {
        free(img);
        failf(f, "mount", ENOMEM, "out of memory");
        return NULL;
    }
    /* ISO 9660 with Rock Ridge, which the kernel uses by default when present. */
    if (path_join(img->path, sizeof img->path, IMAGES_DIR "/%s", serial) < 0 ||
        make_dir_or_fail(KVMPOD_RUN, "mount", f) < 0 || make_dir_or_fail(IMAGES_DIR, "mount", f) < 0 ||
        make_dir_or_fail(img->path, "mount", f) < 0 ||
        mount_at(dev, img->path, "iso9660", MS_RDONLY, NULL, "mount", f) < 0) {
        free(img->serial);
        free(img);
        return NULL;
    }
    img->next = images;
    images = img;
    return img->path;
}

/* The app's root: an overlay of a tmpfs (upper/, work/) on the image. */
static int overlay_root(const char *base, const char *image, const char *root, struct failure *f)
{
    char upper[PATH_MAX], work[PATH_MAX], opts[3 * PATH_MAX + 64];
    if (mount_at("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", "rootfs", f) < 0)
        return -1;
    if (path_join(upper, sizeof upper, "%s/upper", base) < 0 || path_join(work, sizeof work, "%s/work", base) < 0 ||
        path_join(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", image, upper, work) < 0)
        return failf(f, "rootfs", ENAMETOOLONG, "app path too long");
    if (make_dir_or_fail(upper, "rootfs", f) < 0 || make_dir_or_fail(work, "rootfs", f) < 0 ||
        make_dir_or_fail(root, "rootfs", f) < 0)
        return -1;
    return mount_at("overlay", root, "overlay", 0, opts, "rootfs", f);
}

/* A read-only root is the same overlay, made read-only once the agent has added what the
 * executor provides (mount points, /etc/hosts, /etc/resolv.conf): MS_RDONLY on the overlay's own mount, so the app
 * gets EROFS while the filesystems mounted inside it stay as they are. */
static int make_readonly(const char *root, struct failure *f)
{
    if (mount(NULL, root, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0)
        return failf(f, "rootfs", errno, "remount %s read-only: %s", root, strerror(errno));
    return 0;
}

/* --- /etc/hosts --- */

/* openat2(2)'s struct open_how and RESOLVE_* (linux/openat2.h), which musl does not carry. */
struct open_how_kp {
    uint64_t flags, mode, resolve;
};
#define RESOLVE_NO_MAGICLINKS_KP 0x02u
#define RESOLVE_IN_ROOT_KP 0x10u

/* `path` (relative) opened as if the app's root were "/": the image's symlinks cannot lead the
 * agent out of it. */
static int open_in_root(int rootfd, const char *path, int flags, mode_t mode)
{
    struct open_how_kp how = {.flags = (uint64_t)flags | O_CLOEXEC, .mode = mode,
                              .resolve = RESOLVE_IN_ROOT_KP | RESOLVE_NO_MAGICLINKS_KP};
    return (int)syscall(SYS_openat2, rootfd, path, &how, sizeof how);
}

static const char HOSTS[] = "127.0.0.1 localhost\n::1 localhost\n";

static int write_all_or_fail(int fd, const char *content, const char *what, struct failure *f)
{
    size_t len = strlen(content);
    ssize_t n = write(fd, content, len);
    int e = errno;
    close(fd);
    if (n != (ssize_t)len)
        return failf(f, "rootfs", n < 0 ? e : EIO, "write %s in the app's rootfs: %s", what,
                     n < 0 ? strerror(e) : "short write");
    return 0;
}

/* The app root's /etc, made if the image has none. -1 with errno if it cannot be had. */
static int open_etc(int rootfd)
{
    int etc = open_in_root(rootfd, "etc", O_PATH | O_DIRECTORY, 0);
    if (etc < 0 && errno == ENOENT && mkdirat(rootfd, "etc", 0755) == 0)
        etc = open_in_root(rootfd, "etc", O_PATH | O_DIRECTORY, 0);
    return etc;
}

/* /etc/NAME made anew with `content`: what the image has there (a file, or a symlink to wherever,
 * such as systemd-resolved's stub) is replaced in the app's overlay, never followed. */
static int replace_etc_file(int rootfd, const char *name, const char *content, struct failure *f)
{
    int etc = open_etc(rootfd);
    if (etc < 0)
        return failf(f, "rootfs", errno, "open /etc in the app's rootfs: %s", strerror(errno));
    int fd = -1;
    if (unlinkat(etc, name, 0) == 0 || errno == ENOENT)
        fd = openat(etc, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    int e = errno;
    close(etc);
    if (fd < 0)
        return failf(f, "rootfs", e, "replace /etc/%s in the app's rootfs: %s", name, strerror(e));
    char what[64];
    snprintf(what, sizeof what, "/etc/%s", name);
    return write_all_or_fail(fd, content, what, f);
}

/* The executor's /etc/hosts for an image without one (localhost only: the same in every pod); *made when
 * it was created. */
static int create_default_hosts(int rootfd, bool *made, struct failure *f)
{
    *made = false;
    int etc = open_etc(rootfd);
    if (etc < 0)
        return failf(f, "rootfs", errno, "open /etc in the app's rootfs: %s", strerror(errno));
    int fd = openat(etc, "hosts", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    int e = errno;
    close(etc);
    if (fd < 0 && e == EEXIST)
        return 0;
    if (fd < 0)
        return failf(f, "rootfs", e, "create /etc/hosts in the app's rootfs: %s", strerror(e));
    log_debug("created /etc/hosts");
    *made = true;
    return write_all_or_fail(fd, HOSTS, "/etc/hosts", f);
}

/* /etc/hosts: with hosts entries for the pod (--hosts-entry), written anew with localhost, the pod's
 * hostname and the entries. Otherwise the executor gives an app without /etc/hosts one that resolves
 * localhost, and an image's own /etc/hosts (even a dangling symlink) is never touched. */
static int write_hosts(int rootfd, struct failure *f)
{
    const char *entries = net_hosts_entries();
    if (entries) {
        char hostname[HOST_NAME_MAX + 1] = "localhost", content[sizeof HOSTS + HOST_NAME_MAX + 16 + 16384];
        gethostname(hostname, sizeof hostname - 1);
        snprintf(content, sizeof content, "%s127.0.1.1 %s\n%s", HOSTS, hostname, entries);
        return replace_etc_file(rootfd, "hosts", content, f);
    }
    bool made;
    return create_default_hosts(rootfd, &made, f);
}

/* The files the executor provides in /etc: hosts, and resolv.conf when the pod's network gives DNS
 * settings (docs/networking.md). */
static int executor_etc_files(const char *root, struct failure *f)
{
    int rootfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0)
        return failf(f, "rootfs", errno, "open %s: %s", root, strerror(errno));
    const char *resolv = net_resolv_conf();
    int rc = write_hosts(rootfd, f);
    if (rc == 0 && resolv)
        rc = replace_etc_file(rootfd, "resolv.conf", resolv, f);
    close(rootfd);
    return rc;
}

/* --- the appc filesystem set inside an app root --- */

struct fs_mount {
    const char *path;
    const char *type;
    unsigned long flags;
    const char *data;
    bool in_dev; /* lives in the /dev tmpfs: mounted once the nodes are there */
};

static const struct fs_mount APP_MOUNTS[] = {
    {"proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, false},
    {"sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, false},
    {"dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755", false},
    /* A private devpts instance: the app's ptys are its own. */
    {"dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5", true},
    {"dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", true},
};

static const struct {
    const char *name;
    unsigned major, minor;
    mode_t mode;
} DEV_NODES[] = {
    {"null", 1, 3, 0666},   {"zero", 1, 5, 0666}, {"full", 1, 7, 0666},    {"random", 1, 8, 0666},
    {"urandom", 1, 9, 0666}, {"tty", 5, 0, 0666},  {"console", 5, 1, 0600},
};

static const struct {
    const char *name, *target;
} DEV_LINKS[] = {
    {"ptmx", "pts/ptmx"},          {"fd", "/proc/self/fd"},         {"stdin", "/proc/self/fd/0"},
    {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"},
};

static int mount_in_root(const char *root, const struct fs_mount *m, struct failure *f)
{
    char path[PATH_MAX];
    struct stat st;
    if (path_join(path, sizeof path, "%s/%s", root, m->path) < 0)
        return failf(f, "rootfs", ENAMETOOLONG, "app path too long");
    /* A symlink here would point the mount outside the app's root (the agent is not chrooted). */
    if (lstat(path, &st) == 0 && S_ISLNK(st.st_mode))
        return failf(f, "rootfs", ELOOP, "/%s is a symlink in the image: the executor mounts %s there", m->path,
                     m->type);
    if (make_dir_or_fail(path, "rootfs", f) < 0)
        return -1;
    return mount_at(m->type, path, m->type, m->flags, m->data, "rootfs", f);
}

static int populate_dev(const char *root, struct failure *f)
{
    char path[PATH_MAX];
    for (size_t i = 0; i < ARRAY_LEN(DEV_NODES); i++) {
        if (path_join(path, sizeof path, "%s/dev/%s", root, DEV_NODES[i].name) < 0)
            return failf(f, "rootfs", ENAMETOOLONG, "app path too long");
        /* The agent runs with umask 0, so the mode is exact. */
        if (mknod(path, S_IFCHR | DEV_NODES[i].mode, makedev(DEV_NODES[i].major, DEV_NODES[i].minor)) < 0)
            return failf(f, "rootfs", errno, "mknod %s: %s", path, strerror(errno));
    }
    for (size_t i = 0; i < ARRAY_LEN(DEV_LINKS); i++) {
        if (path_join(path, sizeof path, "%s/dev/%s", root, DEV_LINKS[i].name) < 0)
            return failf(f, "rootfs", ENAMETOOLONG, "app path too long");
        if (symlink(DEV_LINKS[i].target, path) < 0)
            return failf(f, "rootfs", errno, "symlink %s: %s", path, strerror(errno));
    }
    return 0;
}

static int appc_filesystems(const char *root, struct failure *f)
{
    for (size_t i = 0; i < ARRAY_LEN(APP_MOUNTS); i++)
        if (!APP_MOUNTS[i].in_dev && mount_in_root(root, &APP_MOUNTS[i], f) < 0)
            return -1;
    if (populate_dev(root, f) < 0)
        return -1;
    for (size_t i = 0; i < ARRAY_LEN(APP_MOUNTS); i++)
        if (APP_MOUNTS[i].in_dev && mount_in_root(root, &APP_MOUNTS[i], f) < 0)
            return -1;
    return 0;
}

/* --- pod volumes (docs/volumes.md) --- */

struct vol_mount {
    char name[NAME_MAX + 1], kind[16], options[256];
    char file[NAME_MAX + 1]; /* non-empty: TARGET is a file, bound from this file of the volume */
    const char *target;
    bool bind_ro; /* read-only in this app */
};

static bool copy_part(char *dst, size_t size, const char *start, const char *end)
{
    size_t n = (size_t)(end - start);
    if (n == 0 || n >= size)
        return false;
    memcpy(dst, start, n);
    dst[n] = '\0';
    return true;
}

/* Options reach mount(2) as data: only the characters the host produces are allowed. */
static bool safe_options(const char *s)
{
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '=' || *s == ','))
            return false;
    return true;
}

/* VOLUME_MOUNT: NAME:KIND:OPTIONS:TARGET; OPTIONS ending in ",bindro" make this app's mount read-only. */
static int parse_vol_mount(const char *spec, struct vol_mount *m, struct failure *f)
{
    const char *a = strchr(spec, ':'), *b = a ? strchr(a + 1, ':') : NULL, *c = b ? strchr(b + 1, ':') : NULL;
    if (!c || !copy_part(m->name, sizeof m->name, spec, a) || !copy_part(m->kind, sizeof m->kind, a + 1, b) ||
        !copy_part(m->options, sizeof m->options, b + 1, c) || !safe_name(m->name) || !safe_options(m->options) ||
        c[1] != '/')
        return failf(f, "request", EINVAL, "bad VOLUME_MOUNT %s", spec);
    m->target = c + 1;
    size_t n = strlen(m->options);
    m->bind_ro = n >= 7 && strcmp(m->options + n - 7, ",bindro") == 0;
    if (m->bind_ro)
        m->options[n - 7] = '\0';
    m->file[0] = '\0';
    char *file = strstr(m->options, ",file=");
    if (file) { /* the volume is the same whichever of its files an app binds: not part of its options */
        if (!copy_part(m->file, sizeof m->file, file + 6, file + strlen(file)) || !safe_name(m->file))
            return failf(f, "request", EINVAL, "bad VOLUME_MOUNT %s", spec);
        *file = '\0';
    }
    return 0;
}

/* The volume's own mount, made on first use; later uses must describe it alike. */
static const char *volume_path(const struct vol_mount *m, struct failure *f)
{
    for (struct volume *v = volumes; v; v = v->next) {
        if (strcmp(v->name, m->name) != 0)
            continue;
        if (strcmp(v->kind, m->kind) != 0 || strcmp(v->options, m->options) != 0)
            failf(f, "volume", EINVAL, "volume %s: mounted as %s:%s before, now %s:%s", m->name, v->kind, v->options,
                  m->kind, m->options);
        return strcmp(v->kind, m->kind) == 0 && strcmp(v->options, m->options) == 0 ? v->path : NULL;
    }
    struct volume *v = calloc(1, sizeof *v);
    if (!v || !(v->name = strdup(m->name)) || !(v->kind = strdup(m->kind)) || !(v->options = strdup(m->options))) {
        if (v) {
            free(v->name);
            free(v->kind);
        }
        free(v);
        failf(f, "volume", ENOMEM, "out of memory");
        return NULL;
    }
    int rc = -1;
    v->mount_index = nmounts;
    if (path_join(v->path, sizeof v->path, VOLUMES_DIR "/%s", m->name) < 0)
        failf(f, "volume", ENAMETOOLONG, "volume path too long");
    else if (make_dir_or_fail(KVMPOD_RUN, "volume", f) < 0 || make_dir_or_fail(VOLUMES_DIR, "volume", f) < 0 ||
             make_dir_or_fail(v->path, "volume", f) < 0)
        ;
    else if (strcmp(m->kind, "empty") == 0)
        /* One tmpfs per volume; OPTIONS are exactly tmpfs's mode=,uid=,gid= */
        rc = mount_at("tmpfs", v->path, "tmpfs", MS_NOSUID | MS_NODEV, m->options, "volume", f);
    else if (strcmp(m->kind, "host") == 0 && strncmp(m->options, "tag=", 4) == 0) {
        /* tag=TAG[,9p][,ro]: virtio-fs, or virtio-9p (the fallback without virtiofsd) */
        char tag[64];
        const char *end = strchr(m->options, ',');
        const char *rest = end ? end : "";
        bool p9 = strncmp(rest, ",9p", 3) == 0;
        bool ro = strcmp(rest + (p9 ? 3 : 0), ",ro") == 0;
        unsigned long flags = MS_NOSUID | MS_NODEV | (ro ? MS_RDONLY : 0);
        if (!copy_part(tag, sizeof tag, m->options + 4, end ? end : m->options + strlen(m->options)) ||
            !(rest[p9 ? 3 : 0] == '\0' || ro))
            failf(f, "request", EINVAL, "volume %s: bad options %s", m->name, m->options);
        else if (p9)
            rc = mount_at(tag, v->path, "9p", flags, "trans=virtio,version=9p2000.L,msize=262144,cache=mmap", "volume",
                          f);
        else
            rc = mount_at(tag, v->path, "virtiofs", flags, NULL, "volume", f);
    } else
        failf(f, "request", EINVAL, "volume %s: unknown kind %s (options %s)", m->name, m->kind, m->options);
    if (rc < 0) {
        free(v->name);
        free(v->kind);
        free(v->options);
        free(v);
        return NULL;
    }
    v->next = volumes;
    volumes = v;
    return v->path;
}

/* The mount point `target` in the app's root, made 0:0 0755 where missing, each component checked
 * without following symlinks (the agent is not chrooted: a symlink would lead the mount out). */
static int volume_target(const char *root, const char *target, bool is_file, char *out, size_t size,
                         struct failure *f)
{
    char copy[PATH_MAX], *save = NULL;
    if (path_join(copy, sizeof copy, "%s", target) < 0 || path_join(out, size, "%s%s", root, target) < 0)
        return failf(f, "volume", ENAMETOOLONG, "volume target %s: path too long", target);
    int fd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return failf(f, "volume", errno, "open %s: %s", root, strerror(errno));
    for (char *c = strtok_r(copy, "/", &save), *after; c; c = after) {
        after = strtok_r(NULL, "/", &save);
        bool last_file = is_file && !after; /* a file target: its last component is a file, made empty */
        if (strcmp(c, ".") == 0 || strcmp(c, "..") == 0) {
            close(fd);
            return failf(f, "request", EINVAL, "volume target %s is not a clean absolute path", target);
        }
        int next = openat(fd, c, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (next < 0 && errno == ENOENT && last_file) {
            int made = openat(fd, c, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
            if (made >= 0)
                close(made);
            if (made >= 0 || errno == EEXIST)
                next = openat(fd, c, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        } else if (next < 0 && errno == ENOENT && (mkdirat(fd, c, 0755) == 0 || errno == EEXIST))
            next = openat(fd, c, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        int e = errno;
        struct stat st;
        if (next >= 0 && fstat(next, &st) < 0)
            e = errno, st.st_mode = 0;
        close(fd);
        if (next < 0)
            return failf(f, "volume", e, "volume target %s: %s: %s", target, c, strerror(e));
        fd = next;
        if (last_file && S_ISREG(st.st_mode))
            break;
        if (last_file || S_ISLNK(st.st_mode) || !S_ISDIR(st.st_mode)) {
            close(fd);
            return failf(f, "volume", S_ISLNK(st.st_mode) ? ELOOP : last_file ? EISDIR : ENOTDIR,
                         "volume target %s: %s is %s in the app's rootfs", target, c,
                         S_ISLNK(st.st_mode) ? "a symlink" : last_file ? "not a regular file" : "not a directory");
        }
    }
    close(fd);
    return 0;
}

/* A failed app setup unmounted everything from `depth` on: the volumes it mounted are gone too. */
static void forget_volumes(size_t depth)
{
    while (volumes && volumes->mount_index >= depth) {
        struct volume *v = volumes;
        volumes = v->next;
        free(v->name);
        free(v->kind);
        free(v->options);
        free(v);
    }
}

static int mount_volumes(const char *root, char *const *specs, size_t n, struct failure *f)
{
    for (size_t i = 0; i < n; i++) {
        struct vol_mount m;
        char target[PATH_MAX], file_src[PATH_MAX];
        const char *src;
        if (parse_vol_mount(specs[i], &m, f) < 0 || !(src = volume_path(&m, f)) ||
            volume_target(root, m.target, m.file[0] != '\0', target, sizeof target, f) < 0)
            return -1;
        if (m.file[0] && path_join(file_src, sizeof file_src, "%s/%s", src, m.file) < 0)
            return failf(f, "volume", ENAMETOOLONG, "volume %s: path too long", m.name);
        if (mount_at(m.file[0] ? file_src : src, target, NULL, MS_BIND, NULL, "volume", f) < 0)
            return -1;
        /* A bind mount takes its flags at remount time: keep nosuid,nodev along with ro. */
        if (m.bind_ro && mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
            return failf(f, "volume", errno, "remount %s read-only: %s", target, strerror(errno));
        log_debug("volume %s (%s) on %s%s", m.name, m.kind, target, m.bind_ro ? " (read-only)" : "");
    }
    return 0;
}

/* What of an app root depends only on its image: the overlay on a tmpfs at `base`, and the appc
 * filesystem set in it. */
static int image_root(const char *base, const char *image, const char *root, struct failure *f)
{
    if (make_dir_or_fail(base, "rootfs", f) < 0)
        return -1;
    return overlay_root(base, image, root, f) < 0 ? -1 : appc_filesystems(root, f);
}

/* The spare's /etc/hosts as an app without hosts entries gets it. Creating it copies the image's /etc up
 * into the overlay, under TCG the costliest step of a restored pod's START (~30 ms, docs/performance.md);
 * the file is the same in every pod, so the snapshot can hold it. A START with entries replaces it. */
static int spare_etc(const char *root, bool *made, struct failure *f)
{
    int rootfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0)
        return failf(f, "rootfs", errno, "open %s: %s", root, strerror(errno));
    int rc = create_default_hosts(rootfd, made, f);
    close(rootfd);
    return rc;
}

int app_prebuild(const char *serial, struct failure *f)
{
    const char *image = image_mount(serial, f);
    if (!image)
        return -1;
    struct spare *s = calloc(1, sizeof *s);
    char root[PATH_MAX];
    if (!s || !(s->serial = strdup(serial))) {
        free(s);
        return failf(f, "rootfs", ENOMEM, "out of memory");
    }
    s->first_mount = nmounts;
    if (path_join(s->base, sizeof s->base, SPARES_DIR "/%s", serial) < 0 ||
        path_join(root, sizeof root, "%s/rootfs", s->base) < 0) {
        failf(f, "rootfs", ENAMETOOLONG, "spare root path too long");
    } else if (make_dir_or_fail(KVMPOD_RUN, "rootfs", f) == 0 && make_dir_or_fail(SPARES_DIR, "rootfs", f) == 0 &&
               image_root(s->base, image, root, f) == 0 && spare_etc(root, &s->made_hosts, f) == 0) {
        s->nmounts = nmounts - s->first_mount;
        s->next = spares;
        spares = s;
        return 0;
    }
    unmount_to(s->first_mount);
    free(s->serial);
    free(s);
    return -1;
}

/* The spare root of `serial` moved to `base`: 1 when taken (its mount entries in *first, *n), 0 when
 * there is none, it cannot be moved, or the app keeps the image's /etc and the spare has the executor's
 * /etc/hosts (the caller builds the root itself). */
static int take_spare(const char *serial, const char *base, bool keep_etc, size_t *first, size_t *n)
{
    struct spare **link = &spares;
    while (*link && strcmp((*link)->serial, serial) != 0)
        link = &(*link)->next;
    struct spare *s = *link;
    if (!s || (keep_etc && s->made_hosts) || make_dir(base, 0755) < 0)
        return 0;
    if (mount(s->base, base, NULL, MS_MOVE, NULL) < 0) {
        log_debug("spare root of %s not used: move to %s: %s", serial, base, strerror(errno));
        return 0;
    }
    if (rebase_mounts(s->first_mount, s->nmounts, s->base, base) < 0) /* shutdown's unmount is best effort */
        log_debug("spare root of %s: out of memory recording its mounts", serial);
    *first = s->first_mount;
    *n = s->nmounts;
    *link = s->next;
    rmdir(s->base);
    free(s->serial);
    free(s);
    return 1;
}

/* A host directory as the app's root: the virtio-fs share mounted in place (what the app writes lands
 * in the directory on the host), with the appc filesystem set on top, which lives in the guest. */
static int share_root(const char *base, const char *tag, const char *root, struct failure *f)
{
    if (make_dir_or_fail(base, "rootfs", f) < 0 || make_dir_or_fail(root, "rootfs", f) < 0 ||
        mount_at(tag, root, "virtiofs", MS_NOSUID | MS_NODEV, NULL, "rootfs", f) < 0)
        return -1;
    return appc_filesystems(root, f);
}

static int build_root(struct app *a, const char *image, const struct app_root_req *req, struct failure *f)
{
    char base[PATH_MAX];
    bool readonly = req->readonly;
    if (path_join(base, sizeof base, APPS_DIR "/%s", a->name) < 0 ||
        path_join(a->root, sizeof a->root, "%s/rootfs", base) < 0)
        return failf(f, "rootfs", ENAMETOOLONG, "app path too long");
    if (make_dir_or_fail(KVMPOD_RUN, "rootfs", f) < 0 || make_dir_or_fail(APPS_DIR, "rootfs", f) < 0)
        return -1;
    size_t spare_first = 0, spare_n = 0;
    bool spare = !req->share_tag && !readonly && req->nmounts == 0 && take_spare(a->serial, base, req->keep_etc, &spare_first, &spare_n);
    if (spare)
        log_debug("app %s: spare root of disk %s moved in", a->name, a->serial);
    else if (req->share_tag ? share_root(base, req->share_tag, a->root, f) < 0 : image_root(base, image, a->root, f) < 0)
        return -1;
    if ((!req->keep_etc && executor_etc_files(a->root, f) < 0) || mount_volumes(a->root, req->mounts, req->nmounts, f) < 0) {
        if (spare) { /* the caller unmounts what this setup mounted; the moved subtree is older */
            umount2(base, MNT_DETACH);
            forget_mounts(spare_first, spare_n);
        }
        return -1;
    }
    return readonly ? make_readonly(a->root, f) : 0;
}

/* The app called `name`: 1 with *root when it exists, 0 when not, -1 with *f when it runs from
 * another disk. */
static int find_app(const char *name, const char *serial, const char **root, struct failure *f)
{
    for (struct app *a = apps; a; a = a->next) {
        if (strcmp(a->name, name) != 0)
            continue;
        if (strcmp(a->serial, serial) != 0)
            return failf(f, "request", EINVAL, "app %s runs from disk %s, not %s", name, a->serial, serial);
        *root = a->root;
        return 1;
    }
    return 0;
}

const char *app_existing_root(const char *name, const char *serial, struct failure *f)
{
    const char *root = NULL;
    int found = find_app(name, serial, &root, f);
    if (found == 0)
        failf(f, "request", ENOENT, "app %s has not been started in this pod", name);
    return found > 0 ? root : NULL;
}

const char *app_prepare(const struct app_root_req *req, struct failure *f)
{
    const char *root = NULL, *name = req->name, *serial = req->serial;
    bool readonly = req->readonly;
    if (!safe_name(name) || !safe_name(serial)) {
        failf(f, "request", EINVAL, "bad app name %s or disk serial %s", name, serial);
        return NULL;
    }
    int found = find_app(name, serial, &root, f);
    if (found != 0)
        return found > 0 ? root : NULL;

    const char *image = req->share_tag ? NULL : image_mount(serial, f);
    if (!req->share_tag && !image)
        return NULL;
    struct app *a = calloc(1, sizeof *a);
    if (!a || !(a->name = strdup(name)) || !(a->serial = strdup(serial))) {
        if (a)
            free(a->name);
        free(a);
        failf(f, "rootfs", ENOMEM, "out of memory");
        return NULL;
    }
    /* The image stays mounted for other apps; this app's own mounts are undone on failure, so a
     * later START can try again from scratch. */
    size_t depth = nmounts;
    if (build_root(a, image, req, f) < 0) {
        unmount_to(depth);
        forget_volumes(depth);
        free(a->name);
        free(a->serial);
        free(a);
        return NULL;
    }
    a->next = apps;
    apps = a;
    log_debug("app %s: root %s (%s%s)", name, a->root, req->share_tag ? "host directory, " : "",
              readonly ? "read-only" : "writable");
    return a->root;
}
