/* PID 1's side of the metadata service: see metadata.h and docs/metadata.md, "Privilege separation". */

#include "metadata.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "log.h"
#include "metadata_msgs.h"
#include "metadata_service.h"
#include "protocol.h"

#define MSGS_PER_ROUND 32 /* the service's messages read per poll round: it cannot keep PID 1 busy */

static struct md_store checked; /* the host's frames as PID 1 checked them; no documents once started */
static int transcript_fd = -1;  /* those frames for the service: a memfd, sealed at METADATA_START */
static int listen_fd = -1;
static int restart_fd = -1; /* a timerfd, armed while a restart is due */
static bool restart_due;

static struct {
    pid_t pid;    /* 0: not running (or reaped) */
    int peer_fd;  /* PID 1's end of its socketpair; -1 once it hung up */
    bool ready;   /* it has set itself up and serves */
    char error[MD_MSG_MAX + 1]; /* what it said last went wrong */
} svc = {.peer_fd = -1};

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* --- the transcript of the frames --- */

static void write_all(int fd, const void *p, size_t len)
{
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fatal("metadata", errno, "keeping the metadata documents: %s", strerror(errno));
        p = (const uint8_t *)p + n;
        len -= (size_t)n;
    }
}

static void transcript_append(const struct frame *f)
{
    uint8_t head[MD_RECORD_HEAD];
    if (transcript_fd < 0 &&
        (transcript_fd = memfd_create("kvmpod-metadata-documents", MFD_CLOEXEC | MFD_ALLOW_SEALING)) < 0)
        fatal("metadata", errno, "memfd_create: %s", strerror(errno));
    le_put(head, f->type, 2);
    le_put(head + 2, f->len, 4);
    write_all(transcript_fd, head, sizeof head);
    write_all(transcript_fd, f->payload, f->len);
}

/* Final: no instance of the service can change what the next one reads. */
static void transcript_seal(void)
{
    if (fcntl(transcript_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0)
        fatal("metadata", errno, "sealing the metadata documents: %s", strerror(errno));
}

/* --- listening --- */

/* Nothing else in the guest configures networking: bring `lo` up (the kernel gives it 127.0.0.1). */
void metadata_loopback_up(void)
{
    struct ifreq ifr = {0};
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        fatal("metadata", errno, "socket: %s (a guest kernel without IPv4?)", strerror(errno));
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        fatal("metadata", errno, "the loopback interface: %s", strerror(errno));
    if (!(ifr.ifr_flags & IFF_UP)) {
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
            fatal("metadata", errno, "bringing the loopback interface up: %s", strerror(errno));
    }
    close(s);
}

/* PID 1 binds, before any app starts, and keeps the socket for the pod's life: no app can take the port,
 * not even while the service restarts, and the service needs neither socket() nor bind(). */
static void start_listening(uint16_t port)
{
    metadata_loopback_up();
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
    if (fd < 0)
        fatal("metadata", errno, "socket: %s", strerror(errno));
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 128) < 0)
        fatal("metadata", errno, "cannot listen on 127.0.0.1:%u: %s", port, strerror(errno));
    listen_fd = fd;
}

/* --- the service process --- */

/* In the forked child: tell PID 1 why the exec did not happen, and go. */
static noreturn void exec_failed(int peer, const char *what)
{
    char msg[1 + MD_MSG_MAX];
    int n = snprintf(msg, sizeof msg, "%cexec: %s: %s", MD_MSG_ERROR, what, strerror(errno));
    (void)!send(peer, msg, n > 0 && (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1, MSG_NOSIGNAL);
    _exit(MD_EXIT_SETUP);
}

/* In the forked child: the service's fds in place (metadata_service.h), then exec of the agent's own binary:
 * a fresh address space, with none of PID 1's memory (the apps' requests, their stdin in flight) and, in a
 * pod restored from a boot snapshot, a layout and stack canary of its own instead of the snapshot's. */
static noreturn void service_exec(int peer)
{
    char name[] = METADATA_SERVICE_NAME, flag[] = "--debug", fd_path[32];
    char *argv[] = {name, log_is_debug() ? flag : NULL, NULL}, *envp[] = {NULL};
    int src[MD_FD_COUNT];
    setsid(); /* away from PID 1's console and process group */
    snprintf(fd_path, sizeof fd_path, "/proc/self/fd/%d", transcript_fd);
    src[0] = src[1] = src[2] = open("/dev/null", O_RDWR | O_CLOEXEC);
    src[MD_FD_PEER] = peer;
    src[MD_FD_LISTEN] = listen_fd;
    src[MD_FD_TRANSCRIPT] = open(fd_path, O_RDONLY | O_CLOEXEC); /* its own offset, and read-only */
    if (src[0] < 0 || src[MD_FD_TRANSCRIPT] < 0)
        exec_failed(peer, "open");
    /* Every source above the targets first, so that no dup2 below replaces a source still to be moved. */
    for (int i = 0; i < MD_FD_COUNT; i++)
        if ((src[i] = fcntl(src[i], F_DUPFD_CLOEXEC, MD_FD_COUNT)) < 0)
            exec_failed(peer, "fcntl");
    for (int i = 0; i < MD_FD_COUNT; i++)
        if (dup2(src[i], i) < 0) /* the copy is not close-on-exec: the one fd set the service gets */
            exec_failed(peer, "dup2");
    execve("/proc/self/exe", argv, envp);
    exec_failed(MD_FD_PEER, "/proc/self/exe");
}

static int service_start(struct failure *f)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        return failf(f, "metadata", errno, "socketpair: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(sv[0]);
        close(sv[1]);
        return failf(f, "metadata", e, "cannot start the metadata service: fork: %s", strerror(e));
    }
    if (pid == 0)
        service_exec(sv[1]);
    close(sv[1]);
    svc.pid = pid;
    svc.peer_fd = sv[0];
    svc.ready = false;
    svc.error[0] = '\0';
    log_debug("metadata: service started: pid %d", (int)pid);
    return 0;
}

static void arm_restart(void)
{
    struct itimerspec its = {.it_value = {.tv_sec = METADATA_RESTART_MS / 1000,
                                          .tv_nsec = (long)(METADATA_RESTART_MS % 1000) * 1000000L}};
    if (restart_fd < 0 && (restart_fd = timerfd_create(CLOCK_BOOTTIME, TFD_NONBLOCK | TFD_CLOEXEC)) < 0)
        fatal("metadata", errno, "timerfd: %s", strerror(errno));
    if (timerfd_settime(restart_fd, 0, &its, NULL) < 0)
        fatal("metadata", errno, "timerfd_settime: %s", strerror(errno));
    restart_due = true;
}

static void restart(void)
{
    struct failure f;
    uint64_t ticks;
    while (read(restart_fd, &ticks, sizeof ticks) > 0)
        ;
    restart_due = false;
    if (service_start(&f) < 0) {
        log_info("metadata: %s; trying again in %u ms", f.msg, METADATA_RESTART_MS);
        arm_restart();
    }
}

/* The service only hangs up by ending; one that closed its end and lives on is not trusted to go by itself.
 * Its pid cannot have been reused: PID 1 forgets it only when it reaps it. */
static void hung_up(void)
{
    close_fd(&svc.peer_fd);
    if (svc.pid > 0)
        kill(svc.pid, SIGKILL);
}

/* Its text as one line of printable ASCII: it comes from a process that serves the apps. */
static void printable(char *s)
{
    for (; *s; s++)
        if (*s < 0x20 || *s > 0x7e)
            *s = '?';
}

static void read_messages(void)
{
    char msg[1 + MD_MSG_MAX + 1];
    for (int i = 0; i < MSGS_PER_ROUND && svc.peer_fd >= 0; i++) {
        ssize_t n = recv(svc.peer_fd, msg, sizeof msg - 1, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0) {
            hung_up();
            return;
        }
        msg[n] = '\0';
        printable(msg + 1);
        if (msg[0] == MD_MSG_READY)
            svc.ready = true;
        else if (msg[0] == MD_MSG_ERROR)
            snprintf(svc.error, sizeof svc.error, "%s", msg + 1);
        else if (msg[0] == MD_MSG_DEBUG)
            log_debug("metadata: %s", msg + 1);
    }
}

void metadata_reaped(pid_t pid, int wstatus)
{
    char how[96];
    if (pid <= 0 || pid != svc.pid)
        return;
    svc.pid = 0; /* first: nothing below may signal a pid that is free again */
    read_messages(); /* its last words are still in the socket */
    close_fd(&svc.peer_fd);
    if (WIFSIGNALED(wstatus))
        snprintf(how, sizeof how, "was killed by signal %d%s", WTERMSIG(wstatus),
                 WTERMSIG(wstatus) == SIGSYS ? " (a syscall its seccomp filter does not allow)" : "");
    else
        snprintf(how, sizeof how, "exited with code %d", WEXITSTATUS(wstatus));
    /* Before READY nothing an app sent has reached it: what ended it would end the next one too. */
    if (!svc.ready)
        fatal("metadata", 0, "the metadata service (pid %d) %s before it served: %s", (int)pid, how,
              svc.error[0] ? svc.error : "no reason given");
    log_info("metadata: the service (pid %d) %s%s%s; restarting it in %u ms", (int)pid, how,
             svc.error[0] ? ": " : "", svc.error, METADATA_RESTART_MS);
    arm_restart();
}

/* --- PID 1's event loop --- */

enum role { ROLE_PEER, ROLE_RESTART };
static enum role roles[METADATA_MAX_POLLFDS];

size_t metadata_pollfds(struct pollfd *pfd, size_t max)
{
    size_t n = 0;
    if (svc.peer_fd >= 0 && n < max) {
        roles[n] = ROLE_PEER;
        pfd[n++] = (struct pollfd){.fd = svc.peer_fd, .events = POLLIN};
    }
    if (restart_due && n < max) {
        roles[n] = ROLE_RESTART;
        pfd[n++] = (struct pollfd){.fd = restart_fd, .events = POLLIN};
    }
    return n;
}

void metadata_handle_events(const struct pollfd *pfd, size_t n)
{
    for (size_t i = 0; i < n && i < ARRAY_LEN(roles); i++) {
        if (!pfd[i].revents)
            continue;
        if (roles[i] == ROLE_PEER && pfd[i].fd == svc.peer_fd)
            read_messages();
        else if (roles[i] == ROLE_RESTART && restart_due)
            restart();
    }
}

void metadata_handle_frame(const struct frame *f)
{
    struct failure err;
    if (metadata_msgs_load(&checked, f, &err) < 0)
        fatal_failure(&err);
    transcript_append(f);
    if (f->type != KP_MSG_METADATA_START)
        return;
    transcript_seal();
    md_drop_documents(&checked); /* the transcript has them; PID 1 only remembers that it started */
    start_listening(checked.port);
    if (service_start(&err) < 0)
        fatal_failure(&err);
    log_debug("metadata service on 127.0.0.1:%u", checked.port);
}
