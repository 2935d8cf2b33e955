/* kvmpod guest agent: /init (PID 1) of the pod VM.
 *
 * Sets up the guest (mounts, kernel modules), takes the host's vsock connection (or finds the
 * virtio-serial port with kvmpod.transport=serial; docs/vsock.md), does the
 * handshake, then serves the host's requests until SHUTDOWN or until the host goes away. It never
 * returns: PID 1 exiting panics the kernel; the VM ends by powering off. */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "app.h"
#include "channel.h"
#include "net.h"
#include "log.h"
#include "metadata.h"
#include "metadata_service.h"
#include "process.h"
#include "protocol.h"
#include "snapshot.h"
#include "tlv.h"
#include "util.h"

#define DEFAULT_CHANNEL "org.kvmpod.agent"
#define MODULE_LIST "/etc/kvmpod/modules"

struct options {
    char channel[128];
    uint32_t vsock_port; /* kvmpod.transport=vsock:PORT: listen there; 0: the virtio-serial port */
    bool crash_after_hello;
};

/* --- guest setup --- */

static const struct {
    const char *path, *type;
    unsigned long flags;
    const char *data;
} EARLY_MOUNTS[] = {
    {"/dev", "devtmpfs", MS_NOSUID, "mode=0755"}, /* first: /dev/kmsg and /dev/null live there */
    {"/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL},
    {"/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL},
    {"/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666,mode=0620,gid=5"},
    {"/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
    {"/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"},
};

static void mount_early(size_t i)
{
    const char *path = EARLY_MOUNTS[i].path, *type = EARLY_MOUNTS[i].type;
    if (make_dir(path, 0755) < 0)
        fatal("mount", errno, "mkdir %s: %s", path, strerror(errno));
    if (mount(type, path, type, EARLY_MOUNTS[i].flags, EARLY_MOUNTS[i].data) < 0 && errno != EBUSY)
        fatal("mount", errno, "mount %s on %s: %s", type, path, strerror(errno));
}

/* The kernel gives PID 1 the console as fds 0-2 only if it could open /dev/console. Make sure
 * they are taken, so no pipe ever lands on them (dup2 onto 0-2 in a child would then misfire). */
static void fill_std_fds(void)
{
    int fd;
    while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= STDERR_FILENO)
        ;
    if (fd > STDERR_FILENO)
        close(fd);
}

static void setup_guest(void)
{
    umask(0); /* modes given to mkdir/mknod are meant exactly; children get 022 back */
    mount_early(0);
    log_open_kmsg();
    fill_std_fds();
    for (size_t i = 1; i < ARRAY_LEN(EARLY_MOUNTS); i++)
        mount_early(i);
}

static void parse_cmdline(struct options *o)
{
    char cmdline[4096];
    snprintf(o->channel, sizeof o->channel, "%s", DEFAULT_CHANNEL);
    if (read_text_file("/proc/cmdline", cmdline, sizeof cmdline) < 0)
        fatal("mount", errno, "/proc/cmdline: %s", strerror(errno));
    for (char *save, *arg = strtok_r(cmdline, " \t\n", &save); arg; arg = strtok_r(NULL, " \t\n", &save)) {
        if (strncmp(arg, "kvmpod.channel=", 15) == 0) {
            if (snprintf(o->channel, sizeof o->channel, "%s", arg + 15) >= (int)sizeof o->channel)
                fatal("channel", ENAMETOOLONG, "kvmpod.channel name is too long");
        } else if (strncmp(arg, "kvmpod.transport=vsock:", 23) == 0) {
            char *end;
            unsigned long port = strtoul(arg + 23, &end, 10);
            if (*end || end == arg + 23 || port == 0 || port > 0xfffffffeul)
                fatal("channel", EINVAL, "bad vsock port in %s", arg);
            o->vsock_port = (uint32_t)port;
        } else if (strcmp(arg, "kvmpod.transport=serial") == 0) {
            o->vsock_port = 0;
        } else if (strcmp(arg, "kvmpod.debug=1") == 0) {
            log_set_debug(true);
        } else if (strcmp(arg, "kvmpod.fault=crash-after-hello") == 0) {
            o->crash_after_hello = true;
        } else if (strncmp(arg, "kvmpod.hostname=", 16) == 0) {
            /* the pod's hostname: apps share the guest's UTS namespace (spec/pods.md) */
            const char *name = arg + 16;
            if (sethostname(name, strlen(name)) < 0)
                fatal("hostname", errno, "sethostname %s: %s", name, strerror(errno));
        }
    }
}

/* Loads the modules /etc/kvmpod/modules lists (paths relative to /, dependencies first). */
static void load_modules(void)
{
    FILE *list = fopen(MODULE_LIST, "re");
    if (!list) {
        if (errno == ENOENT)
            return; /* a kernel with everything built in */
        fatal("module", errno, "%s: %s", MODULE_LIST, strerror(errno));
    }
    char *line = NULL;
    size_t cap = 0;
    unsigned count = 0;
    while (getline(&line, &cap, list) >= 0) {
        char *name = line + strspn(line, " \t/");
        name[strcspn(name, " \t\r\n#")] = '\0';
        if (!*name)
            continue;
        char path[PATH_MAX];
        if (path_join(path, sizeof path, "/%s", name) < 0)
            fatal("module", ENAMETOOLONG, "%s: path too long", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            fatal("module", errno, "cannot open %s: %s", name, strerror(errno));
        /* EEXIST: already loaded (or built in), which is what we want. */
        if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
            fatal("module", errno, "cannot load %s: %s%s", name, strerror(errno),
                  errno == ENOENT ? " (an unknown symbol: is a module it depends on listed after it?)" : "");
        close(fd);
        count++;
    }
    free(line);
    fclose(list);
    log_debug("%u kernel modules loaded", count);
}

/* --- handshake --- */

/* Blocks until a frame has arrived; powers off if the host goes away first. */
static void next_frame(struct frame *f)
{
    struct pollfd p = {.fd = channel_fd(), .events = POLLIN};
    bool host_gone = false;
    while (!channel_next(f)) {
        if (host_gone)
            power_off();
        if (poll(&p, 1, -1) < 0 && errno != EINTR)
            fatal("channel", errno, "poll: %s", strerror(errno));
        if (p.revents)
            host_gone = !channel_fill();
    }
}

/* Test-only fault injection (kvmpod.fault=crash-after-hello): PID 1 really crashes, so the
 * host's tests can check that it reports the resulting kernel panic. Never used otherwise. */
static noreturn void crash(void)
{
    int *volatile nowhere = NULL;
    *nowhere = 1;
    abort();
}

static void handshake(const struct options *o, uint64_t boot_ns)
{
    struct kp_hello hello = {.proto_min = KP_MIN_VERSION, .proto_max = KP_VERSION, .agent_version = AGENT_VERSION,
                             .has_boot_ns = true, .boot_ns = boot_ns};
    channel_wait_for_host();
    channel_send_msg(0, &hello);

    struct frame f;
    next_frame(&f);
    if (f.type != KP_MSG_HELLO_ACK)
        fatal("protocol", 0, "expected HELLO_ACK, got %s", message_name(f.type));
    struct kp_hello_ack ack;
    struct failure err;
    if (kp_hello_ack_decode(&ack, f.payload, f.len, &err) < 0)
        fatal_failure(&err);
    uint32_t version = ack.proto_version;
    if (version < KP_MIN_VERSION || version > KP_VERSION)
        fatal("protocol", 0, "host chose protocol version %u, the agent speaks %u..%u", version, KP_MIN_VERSION,
              KP_VERSION);
    if (o->crash_after_hello)
        crash();
    log_channel_ready();
    log_debug("handshake done: protocol %u, agent %s", version, AGENT_VERSION);
}

/* --- serving --- */

static struct options opts;
static uint64_t agent_start_ns;

/* PREPARE: the host is making a boot snapshot of this VM. Once PREPARED is sent, the VM is stopped
 * and saved at any moment, and every VM restored from it continues here: with a new host, which
 * sends THAW first and then does the handshake anew. */
static void prepare_snapshot(const struct frame *f)
{
    snapshot_prepare(f);
    struct frame thaw;
    next_frame(&thaw);
    if (thaw.type != KP_MSG_THAW)
        fatal("protocol", 0, "expected THAW after PREPARED, got %s", message_name(thaw.type));
    snapshot_thaw(&thaw);
    handshake(&opts, agent_start_ns);
}

static noreturn void shutdown_pod(void)
{
    log_debug("shutdown");
    process_kill_all();
    sync();
    app_unmount_all();
    power_off();
}

static void dispatch(const struct frame *f)
{
    switch (f->type) {
    case KP_MSG_SHUTDOWN:
        shutdown_pod();
    case KP_MSG_HELLO_ACK:
        fatal("protocol", 0, "HELLO_ACK after the handshake");
    case KP_MSG_PREPARE:
        prepare_snapshot(f);
        break;
    case KP_MSG_THAW:
        fatal("protocol", 0, "THAW without PREPARE");
    case KP_MSG_METADATA:
    case KP_MSG_METADATA_START:
        metadata_handle_frame(f);
        break;
    case KP_MSG_NETWORK:
        net_handle_frame(f);
        break;
    default:
        process_handle_frame(f);
    }
}

/* SIGCHLD arrives through a signalfd, so reaping happens in the loop, not in a handler. */
static int sigchld_fd(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
        fatal("channel", errno, "sigprocmask: %s", strerror(errno));
    int fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (fd < 0)
        fatal("channel", errno, "signalfd: %s", strerror(errno));
    return fd;
}

static noreturn void serve(int sigfd)
{
    static struct pollfd pfd[2 + PROCESS_MAX_POLLFDS + METADATA_MAX_POLLFDS];
    bool host_gone = false;
    for (;;) {
        struct frame f;
        while (channel_next(&f))
            dispatch(&f);
        if (host_gone)
            power_off();

        pfd[0] = (struct pollfd){.fd = channel_fd(), .events = POLLIN};
        pfd[1] = (struct pollfd){.fd = sigfd, .events = POLLIN};
        size_t np = process_pollfds(pfd + 2, PROCESS_MAX_POLLFDS);
        size_t n = 2 + np + metadata_pollfds(pfd + 2 + np, ARRAY_LEN(pfd) - 2 - np);
        if (poll(pfd, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            fatal("channel", errno, "poll: %s", strerror(errno));
        }
        if (pfd[0].revents)
            host_gone = !channel_fill();
        process_handle_events(pfd + 2, np);
        metadata_handle_events(pfd + 2 + np, n - 2 - np);
        if (pfd[1].revents) {
            struct signalfd_siginfo si;
            while (read(sigfd, &si, sizeof si) > 0)
                ;
            process_reap(metadata_reaped);
        }
    }
}

int main(int argc, char **argv)
{
    /* The agent's binary is also the metadata service's, which PID 1 starts by exec (metadata.c). */
    if (getpid() != 1 && argc > 0 && strcmp(argv[0], METADATA_SERVICE_NAME) == 0)
        metadata_service_main(argc, argv);
    agent_start_ns = boottime_ns();

    setup_guest();
    parse_cmdline(&opts);
    log_debug("kvmpod-agent %s started; guest filesystems mounted", AGENT_VERSION);
    signal(SIGPIPE, SIG_IGN); /* a process that closed its stdin gives EPIPE, not a signal */
    int sigfd = sigchld_fd();
    load_modules();
    if (opts.vsock_port)
        channel_open_vsock(opts.vsock_port);
    else
        channel_open(opts.channel);
    handshake(&opts, agent_start_ns);
    serve(sigfd);
}
