#include "metadata_service.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "caps.h"
#include "cleanup.h"
#include "metadata_msgs.h"
#include "metadata_server.h"
#include "seccomp.h"

/* What serving needs once set up, and nothing else: no open, no socket, no exec, no signals to others.
 * Names this architecture lacks (poll on arm64) are skipped. */
static char *const ALLOWED_SYSCALLS[] = {
    "accept4", "recvfrom", "sendto", "sendmsg", "setsockopt", "shutdown", "read", "close",
    "poll", "ppoll", "timerfd_settime", "clock_gettime",
    "brk", "mmap", "munmap", "mremap", "madvise", /* malloc */
    "rt_sigreturn", "restart_syscall", "exit", "exit_group", NULL,
};

static bool debug;

static void send_msg(char kind, const char *text)
{
    char msg[1 + MD_MSG_MAX];
    size_t len = strnlen(text, MD_MSG_MAX);
    msg[0] = kind;
    memcpy(msg + 1, text, len);
    (void)!send(MD_FD_PEER, msg, 1 + len, MSG_DONTWAIT | MSG_NOSIGNAL); /* a full socket drops it */
}

void service_debug(const char *fmt, ...)
{
    char line[MD_MSG_MAX + 1];
    va_list ap;
    if (!debug)
        return;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    send_msg(MD_MSG_DEBUG, line);
}

static noreturn void setup_failed(const struct failure *f)
{
    char line[MD_MSG_MAX + 1];
    if (snprintf(line, sizeof line, "%s: %s", f->stage, f->msg) >= (int)sizeof line)
        line[sizeof line - 2] = '~'; /* cut short */
    send_msg(MD_MSG_ERROR, line);
    _exit(MD_EXIT_SETUP);
}

/* PID 1 blocks SIGCHLD and ignores SIGPIPE; exec keeps both. */
static void reset_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    for (int sig = 1; sig < _NSIG; sig++)
        signal(sig, sig == SIGPIPE ? SIG_IGN : SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* chroot into an empty directory nobody but root can write: the filter allows no open anyway, this is
 * what would remain if it did. */
static int enter_empty_root(struct failure *f)
{
    struct stat st;
    if (mkdir(METADATA_SERVICE_ROOT, 0555) < 0 && errno != EEXIST)
        return failf(f, "rootfs", errno, "mkdir %s: %s", METADATA_SERVICE_ROOT, strerror(errno));
    _cleanup_close_ int fd = open(METADATA_SERVICE_ROOT, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return failf(f, "rootfs", errno, "%s: %s", METADATA_SERVICE_ROOT, strerror(errno));
    if (fstat(fd, &st) < 0)
        return failf(f, "rootfs", errno, "fstat %s: %s", METADATA_SERVICE_ROOT, strerror(errno));
    if (st.st_uid != 0 || (st.st_mode & 0022))
        return failf(f, "rootfs", EPERM, "%s is writable by others than root", METADATA_SERVICE_ROOT);
    if (fchdir(fd) < 0 || chroot(".") < 0)
        return failf(f, "rootfs", errno, "chroot %s: %s", METADATA_SERVICE_ROOT, strerror(errno));
    return 0;
}

/* Root to METADATA_SERVICE_UID with no capability in any set (the bounding set first: dropping from it
 * needs CAP_SETPCAP), no way to gain one (no_new_privs) and no ptrace or core dump by anyone (not dumpable). */
static int drop_privileges(struct failure *f)
{
    const uid_t uid = METADATA_SERVICE_UID;
    const gid_t gid = METADATA_SERVICE_GID;
    if (caps_prepare(0, uid, false, f) < 0)
        return -1;
    if (setgroups(0, NULL) < 0)
        return failf(f, "group", errno, "setgroups: %s", strerror(errno));
    if (setresgid(gid, gid, gid) < 0)
        return failf(f, "group", errno, "setresgid %u: %s", (unsigned)gid, strerror(errno));
    if (setresuid(uid, uid, uid) < 0)
        return failf(f, "user", errno, "setresuid %u: %s", (unsigned)uid, strerror(errno));
    if (caps_finish(0, uid, false, f) < 0)
        return -1;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        return failf(f, "capabilities", errno, "prctl: %s", strerror(errno));
    return 0;
}

static int confine(struct failure *f)
{
    struct seccomp_filter filter;
    if (seccomp_allow_only(ALLOWED_SYSCALLS, &filter, f) < 0)
        return -1;
    int rc = seccomp_install(&filter, f);
    seccomp_filter_free(&filter);
    return rc;
}

/* Reads fd to its end into a malloc'ed buffer (the caller's to free). */
static int read_all(int fd, uint8_t **out, size_t *out_len, struct failure *f)
{
    size_t len = 0, cap = 0;
    _cleanup_free_ uint8_t *buf = NULL;
    for (;;) {
        if (len == cap) {
            uint8_t *grown = realloc(buf, cap = cap ? 2 * cap : 65536);
            if (!grown)
                return failf(f, "metadata", ENOMEM, "out of memory for the metadata documents");
            buf = grown;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n > 0)
            len += (size_t)n;
        else if (n == 0)
            break;
        else if (errno != EINTR)
            return failf(f, "metadata", errno, "reading the documents: %s", strerror(errno));
    }
    *out = buf;
    *out_len = len;
    buf = NULL; /* the caller's now */
    return 0;
}

/* The transcript's frames into the store, through the same decoder PID 1 checked them with. */
static int load_transcript(struct md_store *s, struct failure *f)
{
    _cleanup_free_ uint8_t *buf = NULL;
    size_t len = 0, pos = 0;
    if (read_all(MD_FD_TRANSCRIPT, &buf, &len, f) < 0)
        return -1;
    while (pos < len) {
        if (len - pos < MD_RECORD_HEAD || le_get(buf + pos + 2, 4) > len - pos - MD_RECORD_HEAD)
            return failf(f, "metadata", EINVAL, "the documents are cut short");
        struct frame fr = {.type = (uint16_t)le_get(buf + pos, 2), .len = le_get(buf + pos + 2, 4),
                           .payload = buf + pos + MD_RECORD_HEAD};
        pos += MD_RECORD_HEAD + fr.len;
        if (metadata_msgs_load(s, &fr, f) < 0)
            return -1;
    }
    if (!s->started)
        return failf(f, "metadata", EINVAL, "the documents end before METADATA_START");
    return 0;
}

noreturn void metadata_service_main(int argc, char **argv)
{
    static struct md_store store;
    struct failure f;
    debug = argc > 1 && strcmp(argv[1], "--debug") == 0;
    prctl(PR_SET_NAME, METADATA_SERVICE_NAME, 0, 0, 0); /* exec of /proc/self/exe named it "exe" */
    reset_signals();
    int timer = timerfd_create(CLOCK_BOOTTIME, TFD_NONBLOCK | TFD_CLOEXEC);
    if (timer < 0)
        failf(&f, "metadata", errno, "timerfd: %s", strerror(errno));
    if (timer < 0 || enter_empty_root(&f) < 0 || drop_privileges(&f) < 0 || confine(&f) < 0 ||
        load_transcript(&store, &f) < 0)
        setup_failed(&f);
    close(MD_FD_TRANSCRIPT);
    send_msg(MD_MSG_READY, "");
    service_debug("serving 127.0.0.1:%u for %zu apps as uid %u", store.port, store.n_apps,
                  (unsigned)METADATA_SERVICE_UID);
    metadata_serve(&store, MD_FD_LISTEN, timer, MD_FD_PEER);
}
