/* kvmpod-relay: holds an idle pod's host end in place of the kvmpod process (docs/relay.md).
 *
 * A pod whose apps run quietly needs its host process for one thing only: copying the apps'
 * output from the agent channel to kvmpod's stdout/stderr or the pod's log files. The Python
 * process that set the pod up costs ~20 MiB for that; this program costs well under 1 MiB. kvmpod
 * execs it (same pid, so QEMU stays its child and state.json stays true) once the pod has been
 * quiet for a while, handing it the channels as inherited fds. It relays STDOUT and STDERR frames
 * of the apps' streams and nothing else: on any other frame, on a QMP event, a control connection,
 * a signal, or QEMU's end it execs the Python side back (the argv after `--`), adding
 *
 *   --unread FD   a memfd with the agent bytes it read but did not relay (from a frame boundary)
 *   --why WHAT    agent | qmp | control | qemu | signal
 *   --signal N    the signal it took from the pending set (only with --why signal)
 *   --broken FD   an output fd that failed (EPIPE...): its output is dropped from then on
 *
 * It reads nothing but the agent channel: QMP messages and control connections stay queued in
 * their sockets for the Python side. It never writes to the guest, so it needs no flow control:
 * the host grants output no credit (docs/agent-protocol.md). SIGINT, SIGTERM and SIGHUP arrive
 * blocked (kvmpod blocks them before exec, so none is lost in between) and are read from a
 * signalfd; they stay blocked across the exec back, where kvmpod unblocks them once it handles them.
 *
 * Usage (kvmpod/pod/relay.py builds it):
 *   kvmpod-relay --agent FD --qmp FD --control FD --qemu PIDFD --unread FD
 *                [--stream ID:OUTFD:ERRFD]... [--broken FD]... -- RESUME_ARGV...
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "protocol.h"

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

#define MAX_STREAMS KP_MAX_STREAMS
#define MAX_FDS 64

struct stream { uint32_t id; int out_fd, err_fd; };

static struct stream streams[MAX_STREAMS];
static size_t n_streams;
static int broken[MAX_FDS];
static size_t n_broken;
static int agent_fd = -1, qmp_fd = -1, control_fd = -1, qemu_fd = -1, unread_fd = -1;
static char **resume_argv;
static int resume_argc;

/* Agent bytes read but not yet relayed; they always start at a frame boundary. */
static unsigned char *buf;
static size_t buf_len, buf_cap;

static void die(const char *what)
{
    fprintf(stderr, "kvmpod-relay: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(const char *what, const char *option)
{
    fprintf(stderr, "kvmpod-relay: %s%s%s (it is started by kvmpod; docs/relay.md)\n", option ? option : "",
            option ? ": " : "", what);
    exit(2);
}

static int parse_fd(const char *option, const char *text)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < 0 || v > 1 << 20)
        usage("not an fd number", option);
    return (int)v;
}

static int is_broken(int fd)
{
    for (size_t i = 0; i < n_broken; i++)
        if (broken[i] == fd)
            return 1;
    return 0;
}

static void mark_broken(int fd)
{
    if (!is_broken(fd) && n_broken < MAX_FDS)
        broken[n_broken++] = fd;
}

static void parse_args(int argc, char **argv)
{
    int i;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) {
            resume_argv = argv + i + 1;
            resume_argc = argc - i - 1;
            break;
        }
        if (i + 1 >= argc)
            usage("lacks its value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--agent")) agent_fd = parse_fd(a, v);
        else if (!strcmp(a, "--qmp")) qmp_fd = parse_fd(a, v);
        else if (!strcmp(a, "--control")) control_fd = parse_fd(a, v);
        else if (!strcmp(a, "--qemu")) qemu_fd = parse_fd(a, v);
        else if (!strcmp(a, "--unread")) unread_fd = parse_fd(a, v);
        else if (!strcmp(a, "--broken")) mark_broken(parse_fd(a, v));
        else if (!strcmp(a, "--stream")) {
            unsigned long id;
            int out, err;
            if (n_streams >= MAX_STREAMS || sscanf(v, "%lu:%d:%d", &id, &out, &err) != 3 || !id || out < 0 || err < 0)
                usage("takes ID:OUTFD:ERRFD", a);
            streams[n_streams++] = (struct stream){ (uint32_t)id, out, err };
        } else
            usage("unknown option", a);
    }
    if (agent_fd < 0 || qmp_fd < 0 || control_fd < 0 || qemu_fd < 0 || unread_fd < 0 || resume_argc < 1)
        usage("--agent, --qmp, --control, --qemu, --unread and a resume command after -- are needed", NULL);
}

static void reserve(size_t need)
{
    if (need <= buf_cap)
        return;
    unsigned char *bigger = realloc(buf, need);
    if (!bigger)
        die("out of memory");
    buf = bigger;
    buf_cap = need;
}

/* The bytes kvmpod had read but not dispatched when it handed over. */
static void load_unread(void)
{
    reserve(KP_HEADER_SIZE + KP_MAX_PAYLOAD);
    for (;;) {
        if (buf_len == buf_cap)
            reserve(buf_cap * 2);
        ssize_t n = read(unread_fd, buf + buf_len, buf_cap - buf_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("reading the unread agent bytes");
        if (n == 0)
            break;
        buf_len += (size_t)n;
    }
    close(unread_fd);
}

static uint32_t le32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* Write all of `data` to `fd` as a blocking write would (kvmpod's own sinks block too); a failing
 * fd is marked broken and its output dropped from then on, as kvmpod does. */
static void write_out(int fd, const unsigned char *data, size_t len)
{
    while (len && !is_broken(fd)) {
        ssize_t n = write(fd, data, len);
        if (n > 0) {
            data += n;
            len -= (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            struct pollfd p = { .fd = fd, .events = POLLOUT };
            poll(&p, 1, -1);
        } else {
            mark_broken(fd);
        }
    }
}

static const struct stream *find_stream(uint32_t id)
{
    for (size_t i = 0; i < n_streams; i++)
        if (streams[i].id == id)
            return &streams[i];
    return NULL;
}

/* Relay the complete output frames at the head of the buffer. Returns 1 when the head frame is one
 * for kvmpod (any other type, an unknown stream, a header kvmpod must judge), else 0. */
static int relay_buffered(void)
{
    size_t off = 0;
    int for_kvmpod = 0;
    while (buf_len - off >= KP_HEADER_SIZE) {
        const unsigned char *h = buf + off;
        uint32_t length = le32(h), stream = le32(h + 8);
        uint16_t type = le16(h + 4), flags = le16(h + 6);
        const struct stream *s = find_stream(stream);
        if (length > KP_MAX_PAYLOAD || flags || (type != KP_MSG_STDOUT && type != KP_MSG_STDERR) || !s) {
            for_kvmpod = 1;
            break;
        }
        if (buf_len - off < KP_HEADER_SIZE + length)
            break;
        write_out(type == KP_MSG_STDOUT ? s->out_fd : s->err_fd, h + KP_HEADER_SIZE, length);
        off += KP_HEADER_SIZE + length;
    }
    memmove(buf, buf + off, buf_len - off);
    buf_len -= off;
    return for_kvmpod;
}

static void resume(const char *why, int signo)
{
    int fd = memfd_create("kvmpod-agent-unread", 0);
    if (fd < 0)
        die("memfd_create");
    for (size_t off = 0; off < buf_len;) {
        ssize_t n = write(fd, buf + off, buf_len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("writing the unread agent bytes");
        off += (size_t)n;
    }
    if (lseek(fd, 0, SEEK_SET) < 0)
        die("lseek");

    char **argv = calloc((size_t)resume_argc + 8 + 2 * n_broken, sizeof *argv);
    static char fd_text[16], sig_text[16];
    static char broken_text[MAX_FDS][16];
    if (!argv)
        die("out of memory");
    int n = 0;
    for (int i = 0; i < resume_argc; i++)
        argv[n++] = resume_argv[i];
    snprintf(fd_text, sizeof fd_text, "%d", fd);
    argv[n++] = "--unread";
    argv[n++] = fd_text;
    argv[n++] = "--why";
    argv[n++] = (char *)why;
    if (signo) {
        snprintf(sig_text, sizeof sig_text, "%d", signo);
        argv[n++] = "--signal";
        argv[n++] = sig_text;
    }
    for (size_t i = 0; i < n_broken; i++) {
        snprintf(broken_text[i], sizeof broken_text[i], "%d", broken[i]);
        argv[n++] = "--broken";
        argv[n++] = broken_text[i];
    }
    argv[n] = NULL;
    execv(argv[0], argv);
    /* kvmpod cannot come back: end the VM rather than leave it running with nobody to answer for it
     * (the pod directory stays for `kvmpod gc`) */
    fprintf(stderr, "kvmpod-relay: cannot exec %s: %s: ending the pod\n", argv[0], strerror(errno));
    syscall(SYS_pidfd_send_signal, qemu_fd, SIGKILL, NULL, 0);
    exit(1);
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);  /* a closed stdout reader: EPIPE marks the fd broken */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
        die("sigprocmask");
    int sig_fd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sig_fd < 0)
        die("signalfd");
    /* the pidfd is ours alone; kvmpod opens its own when it comes back */
    if (fcntl(qemu_fd, F_SETFD, FD_CLOEXEC) < 0)
        die("fcntl");
    load_unread();

    struct pollfd fds[5] = {
        { .fd = sig_fd, .events = POLLIN },
        { .fd = qemu_fd, .events = POLLIN },
        { .fd = qmp_fd, .events = POLLIN },
        { .fd = control_fd, .events = POLLIN },
        { .fd = agent_fd, .events = POLLIN },
    };
    for (;;) {
        if (relay_buffered())
            resume("agent", 0);
        if (buf_len == buf_cap)  /* cannot happen: the buffer holds the largest frame */
            resume("agent", 0);
        if (poll(fds, 5, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (fds[0].revents) {
            struct signalfd_siginfo si;
            if (read(sig_fd, &si, sizeof si) == (ssize_t)sizeof si)
                resume("signal", (int)si.ssi_signo);
        }
        if (fds[1].revents)
            resume("qemu", 0);
        if (fds[2].revents)
            resume("qmp", 0);
        if (fds[3].revents)
            resume("control", 0);
        if (fds[4].revents) {
            ssize_t n = read(agent_fd, buf + buf_len, buf_cap - buf_len);
            if (n > 0)
                buf_len += (size_t)n;
            else if (n == 0 || (errno != EINTR && errno != EAGAIN))
                resume("agent", 0);  /* EOF or an error: kvmpod reads it again and explains it */
        }
    }
}
