#include "process.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "app.h"
#include "log.h"
#include "pty.h"
#include "spawn.h"
#include "stdin_window.h"
#include "messages.h"

#define KILL_WAIT_MS 2000u

/* --- streams --- */

/* A stream's life: [PRE_START ->] STARTING -> RUNNING [-> POST_STOP] -> EXIT. PRE_START and
 * POST_STOP run the app's event handlers; the main process runs from STARTING to RUNNING. */
enum stream_state { FREE, PRE_START, STARTING, RUNNING, POST_STOP };
enum { OUT_STDOUT, OUT_STDERR };

struct stream {
    enum stream_state state;
    uint32_t id;
    pid_t pid;         /* the process running now: an event handler or the main process */
    int report_fd;     /* that process's setup report pipe, until its outcome is known */
    int stdin_fd;      /* -1: no stdin pipe, or closed */
    int out_fd[2];     /* stdout, stderr read ends; -1 once closed */
    int child_in;      /* the main process's stdin, until it is forked */
    int child_out[2];  /* the write ends every process of the stream gets, until the last is forked */
    int tty_fd;        /* START_FLAG_TTY: the pty's master, for RESIZE; else -1 */
    struct start_req req;
    const char *root;
    int main_status;   /* wait status of the main process, while post-stop runs */
    struct stdin_window in; /* stdin received but not yet written */
    bool in_eof;       /* STDIN_EOF came: close stdin once `in` is written */
};

static struct stream streams[KP_MAX_STREAMS];

static struct stream *stream_by_id(uint32_t id)
{
    for (size_t i = 0; i < ARRAY_LEN(streams); i++)
        if (streams[i].state != FREE && streams[i].id == id)
            return &streams[i];
    return NULL;
}

static struct stream *stream_by_pid(pid_t pid)
{
    for (size_t i = 0; i < ARRAY_LEN(streams); i++)
        if (streams[i].state != FREE && streams[i].pid == pid)
            return &streams[i];
    return NULL;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static struct stream *stream_alloc(uint32_t id)
{
    for (size_t i = 0; i < ARRAY_LEN(streams); i++) {
        struct stream *s = &streams[i];
        if (s->state == FREE) {
            *s = (struct stream){.state = STARTING, .id = id, .pid = -1, .report_fd = -1, .stdin_fd = -1,
                                 .out_fd = {-1, -1}, .child_in = -1, .child_out = {-1, -1}, .tty_fd = -1};
            return s;
        }
    }
    return NULL;
}

static void stream_free(struct stream *s)
{
    int *fds[] = {&s->report_fd, &s->stdin_fd, &s->out_fd[0], &s->out_fd[1], &s->child_in, &s->child_out[0],
                  &s->child_out[1], &s->tty_fd};
    for (size_t i = 0; i < ARRAY_LEN(fds); i++)
        close_fd(fds[i]);
    start_req_free(&s->req);
    stdin_window_free(&s->in);
    *s = (struct stream){.state = FREE};
}

/* --- output --- */

/* An app writing in small pieces (busybox cat: 4 KiB) wakes the agent at each write, and the agent,
 * which mostly sleeps, preempts it (sched_yield() does not hand the CPU back: the scheduler picks the
 * agent again). Sending each piece as a frame cost a virtio kick, a host wake-up and an interrupt per
 * 4 KiB, half the guest's time under TCG. So when a running process's pipe holds less than half a
 * chunk, the agent waits PAUSE_NS before taking it: once per frame, which bounds what it adds to
 * output's latency (and to the agent's other work). The pause comes before the pipe is taken, not
 * after: a writer that finds its pipe emptied writes into it again at once, and taking first, then
 * pausing was 30 % slower (256 MiB through cat: 17.0 s against 13.2 in the guest). */
#define PAUSE_NS 1000000L

static void pause_if_little(int fd)
{
    int held = 0;
    if (ioctl(fd, FIONREAD, &held) == 0 && held > 0 && (size_t)held < KP_DATA_CHUNK / 2) {
        struct timespec pause = {0, PAUSE_NS};
        nanosleep(&pause, NULL); /* a signal cutting it short is fine: the frame goes sooner */
    }
}

/* Relays up to `limit` bytes from one output pipe (or pty), a frame of at most KP_DATA_CHUNK at a
 * time: a pipe's bytes spliced (channel_stage), a pty's read straight into the frame; stops at
 * EAGAIN and closes the fd at EOF (or on an error). `wait`: the process runs, so pause_if_little(). */
static void relay_output(struct stream *s, int which, size_t limit, bool wait)
{
    static const uint16_t type[2] = {[OUT_STDOUT] = KP_MSG_STDOUT, [OUT_STDERR] = KP_MSG_STDERR};
    bool is_pipe = s->out_fd[which] >= 0 && fcntl(s->out_fd[which], F_GETPIPE_SZ) > 0;
    size_t total = 0;
    while (s->out_fd[which] >= 0 && total < limit) {
        if (wait)
            pause_if_little(s->out_fd[which]);
        ssize_t n;
        if (is_pipe) {
            n = channel_stage(s->out_fd[which], KP_DATA_CHUNK);
            if (n > 0)
                channel_send_staged(type[which], s->id);
        } else {
            uint8_t *buf = channel_payload_space();
            n = read(s->out_fd[which], buf, KP_DATA_CHUNK);
            if (n > 0)
                channel_send(type[which], s->id, buf, (size_t)n);
        }
        if (n > 0) {
            total += (size_t)n;
        } else if (n < 0 && errno == EINVAL && is_pipe) {
            is_pipe = false; /* splice refused: read it */
        } else if (n < 0 && errno == EAGAIN) {
            return;
        } else if (!(n < 0 && errno == EINTR)) {
            close_fd(&s->out_fd[which]); /* EOF: every writer has closed it (or an error) */
        }
    }
}

/* Everything written before a process ended is in the pipes; relay that, but no more than a pipe
 * holds: a background child that inherited the pipe may keep writing forever. A pty (no pipe
 * size) buffers less than four chunks. */
static void drain_output(struct stream *s)
{
    for (int which = OUT_STDOUT; which <= OUT_STDERR; which++) {
        int size = s->out_fd[which] >= 0 ? fcntl(s->out_fd[which], F_GETPIPE_SZ) : 0;
        relay_output(s, which, size > 0 ? (size_t)size : 4 * KP_DATA_CHUNK, false);
    }
}

/* --- START --- */

/* Forks one of the stream's processes. `last`: no process follows it, so the agent lets go of
 * the write ends (the pipes then see EOF once the processes are gone). */
static int fork_child(struct stream *s, char *const *argv, int stdin_fd, bool last, struct failure *f)
{
    const int stdio[3] = {stdin_fd, s->child_out[OUT_STDOUT], s->child_out[OUT_STDERR]};
    struct spawned sp;
    if (spawn(&s->req, argv, s->root, stdio, &sp, f) < 0)
        return -1;
    s->pid = sp.pid;
    s->report_fd = sp.report_fd;
    if (last) {
        close_fd(&s->child_out[OUT_STDOUT]);
        close_fd(&s->child_out[OUT_STDERR]);
    }
    return 0;
}

static int start_main(struct stream *s, struct failure *f)
{
    if (fork_child(s, s->req.msg.arg.v, s->child_in, s->req.msg.post_stop.n == 0, f) < 0)
        return -1;
    close_fd(&s->child_in);
    s->state = STARTING;
    log_debug("stream %u: forked pid %d", s->id, (int)s->pid);
    return 0;
}

/* Event handlers read /dev/null and write to the app's stdout and stderr. */
static int start_handler(struct stream *s, enum stream_state state, struct failure *f)
{
    const struct kp_strs *argv = state == PRE_START ? &s->req.msg.pre_start : &s->req.msg.post_stop;
    if (fork_child(s, argv->v, -1, state == POST_STOP, f) < 0)
        return -1;
    s->state = state;
    log_debug("stream %u: %s handler %s: pid %d", s->id, state == PRE_START ? "pre-start" : "post-stop",
              argv->v[0], (int)s->pid);
    return 0;
}

/* START_FLAG_ENTER: the app's existing root; otherwise the app's root, made by its first START. */
static const char *stream_root(const struct start_req *r, struct failure *f)
{
    const struct kp_start *m = &r->msg;
    if (m->start_flags & KP_START_FLAG_ENTER)
        return app_existing_root(m->app_name, m->disk_serial, f);
    struct app_root_req req = {.name = m->app_name, .serial = m->disk_serial, .share_tag = m->root_tag,
                               .readonly = m->start_flags & KP_START_FLAG_READONLY_ROOTFS,
                               .keep_etc = m->start_flags & KP_START_FLAG_KEEP_ETC,
                               .mounts = m->volume_mount.v, .nmounts = m->volume_mount.n};
    return app_prepare(&req, f);
}

/* The stream's stdio: a pty (START_FLAG_TTY), else pipes. */
static int stream_stdio(struct stream *s, struct stream_pipes *pipes, struct failure *f)
{
    const struct kp_start *m = &s->req.msg;
    if (m->start_flags & KP_START_FLAG_TTY)
        return pty_open(s->root, m->tty_rows, m->tty_cols, pipes, &s->tty_fd, f);
    return spawn_pipes(m->start_flags & KP_START_FLAG_STDIN, pipes, f);
}

static void on_start(const struct frame *fr)
{
    if (stream_by_id(fr->stream))
        fatal("protocol", 0, "START for stream %u, which is already running", fr->stream);
    struct start_req r = {0};
    struct stream_pipes pipes;
    struct failure f;
    struct stream *s = NULL;

    if (start_req_parse(&r, fr->payload, fr->len, &f) < 0)
        goto failed;
    log_debug("stream %u: START %s app %s disk %s", fr->stream, r.msg.arg.v[0], r.msg.app_name, r.msg.disk_serial);
    if (!(s = stream_alloc(fr->stream))) {
        failf(&f, "request", EAGAIN, "too many processes: the agent serves %u at once", KP_MAX_STREAMS);
        goto failed;
    }
    s->req = r; /* the stream owns the request now */
    r = (struct start_req){0};
    if (!(s->root = stream_root(&s->req, &f)) || stream_stdio(s, &pipes, &f) < 0)
        goto failed;
    s->stdin_fd = pipes.stdin_fd;
    s->out_fd[OUT_STDOUT] = pipes.stdout_fd;
    s->out_fd[OUT_STDERR] = pipes.stderr_fd;
    s->child_in = pipes.child_in;
    s->child_out[OUT_STDOUT] = pipes.child_out;
    s->child_out[OUT_STDERR] = pipes.child_err;
    if ((s->req.msg.pre_start.n ? start_handler(s, PRE_START, &f) : start_main(s, &f)) < 0)
        goto failed;
    return;

failed:
    log_debug("stream %u: %s: %s", fr->stream, f.stage, f.msg);
    channel_send_error(fr->stream, &f);
    if (s)
        stream_free(s);
    start_req_free(&r);
}

/* Acts on the main process's setup outcome: exec'd -> STARTED, the process runs. Failed -> ERROR
 * and the stream is forgotten (the child exits by itself and is reaped as an orphan). */
static void resolve_start(struct stream *s, bool child_gone)
{
    struct failure f;
    int rc = spawn_result(s->report_fd, child_gone, &f);
    if (rc == 0)
        return;
    close_fd(&s->report_fd);
    if (rc > 0) {
        s->state = RUNNING;
        channel_send_msg(s->id, &(struct kp_started){.pid = (uint32_t)s->pid});
        log_debug("stream %u: pid %d started", s->id, (int)s->pid);
        return;
    }
    log_debug("stream %u: %s: %s", s->id, f.stage, f.msg);
    channel_send_error(s->id, &f);
    stream_free(s);
}

/* --- stdin --- */

static void close_stdin(struct stream *s)
{
    close_fd(&s->stdin_fd);
    stdin_window_free(&s->in);
}

/* Writes buffered stdin as far as the pipe takes it and returns the credit (WINDOW). */
static void stdin_flush(struct stream *s)
{
    size_t written = 0, pending;
    const uint8_t *p;
    while ((p = stdin_window_pending(&s->in, &pending))) {
        ssize_t n = write(s->stdin_fd, p, pending);
        if (n > 0) {
            stdin_window_taken(&s->in, (size_t)n);
            written += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            break;
        } else {
            /* The process closed its stdin (EPIPE): it will never read the rest. Credit it, so
             * the host does not wait for a window that would never open. */
            written += pending;
            close_stdin(s);
        }
    }
    if (s->in_eof && s->in.len == 0)
        close_stdin(s);
    if (written)
        channel_send_msg(s->id, &(struct kp_window){.bytes = (uint32_t)written});
}

static void on_stdin(struct stream *s, const struct frame *fr)
{
    if (fr->len == 0)
        return;
    if (s->stdin_fd < 0 || s->in_eof) { /* nobody reads it: drop it, but return the credit */
        channel_send_msg(s->id, &(struct kp_window){.bytes = fr->len});
        return;
    }
    struct failure f;
    if (stdin_window_put(&s->in, s->id, fr->payload, fr->len, &f) < 0)
        fatal_failure(&f);
    stdin_flush(s);
}

/* --- exit and event handlers --- */

static void describe_status(int wstatus, char *buf, size_t size)
{
    if (WIFSIGNALED(wstatus))
        snprintf(buf, size, "was killed by signal %d", WTERMSIG(wstatus));
    else
        snprintf(buf, size, "exited with code %d", WEXITSTATUS(wstatus));
}

/* True (with *f, stage `name` or the setup's own) when an event handler did not succeed. */
static bool handler_failed(struct stream *s, int wstatus, const char *name, const char *path, struct failure *f)
{
    int rc = spawn_result(s->report_fd, true, f);
    close_fd(&s->report_fd);
    if (rc < 0) {
        /* A user, group or working directory problem is the app's, whoever met it first. */
        if (strcmp(f->stage, "exec") == 0) {
            char msg[sizeof f->msg];
            memcpy(msg, f->msg, sizeof msg);
            failf(f, name, f->err, "app %s: %s handler: %s", s->req.msg.app_name, name, msg);
        }
        return true;
    }
    if (WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0)
        return false;
    char status[64];
    describe_status(wstatus, status, sizeof status);
    failf(f, name, 0, "app %s: %s handler %s %s", s->req.msg.app_name, name, path, status);
    return true;
}

/* The stream's end: its remaining output, then EXIT with the main process's status. */
static void finish(struct stream *s, int wstatus)
{
    drain_output(s);
    if (WIFSIGNALED(wstatus)) {
        channel_send_msg(s->id, &(struct kp_exit){.has_term_signal = true, .term_signal = (uint32_t)WTERMSIG(wstatus)});
        log_debug("stream %u: killed by signal %d", s->id, WTERMSIG(wstatus));
    } else {
        channel_send_msg(s->id, &(struct kp_exit){.has_exit_code = true, .exit_code = WEXITSTATUS(wstatus)});
        log_debug("stream %u: exited with %d", s->id, WEXITSTATUS(wstatus));
    }
    stream_free(s);
}

/* pre-start ended: the main process starts, or the START fails (no EXIT follows). */
static void pre_start_done(struct stream *s, int wstatus)
{
    struct failure f;
    if (!handler_failed(s, wstatus, "pre-start", s->req.msg.pre_start.v[0], &f) && start_main(s, &f) == 0)
        return;
    drain_output(s); /* the handler's own words come before the error */
    log_debug("stream %u: %s: %s", s->id, f.stage, f.msg);
    channel_send_error(s->id, &f);
    stream_free(s);
}

/* The main process ended: post-stop runs (killed or not), then EXIT. */
static void main_done(struct stream *s, int wstatus)
{
    struct failure f;
    if (s->req.msg.post_stop.n) {
        s->main_status = wstatus;
        if (start_handler(s, POST_STOP, &f) == 0)
            return;
        log_info("app %s: post-stop handler not run: %s", s->req.msg.app_name, f.msg);
    }
    finish(s, wstatus);
}

/* A failing post-stop is reported, but the app's exit status is the main process's. */
static void post_stop_done(struct stream *s, int wstatus)
{
    struct failure f;
    if (handler_failed(s, wstatus, "post-stop", s->req.msg.post_stop.v[0], &f))
        log_info("%s (the app's exit status stands)", f.msg);
    finish(s, s->main_status);
}

static void reaped(struct stream *s, int wstatus)
{
    switch (s->state) {
    case PRE_START:
        pre_start_done(s, wstatus);
        break;
    case STARTING:
        resolve_start(s, true);
        if (s->state == RUNNING)
            main_done(s, wstatus);
        break;
    case RUNNING:
        main_done(s, wstatus);
        break;
    case POST_STOP:
        post_stop_done(s, wstatus);
        break;
    case FREE:
        break;
    }
}

void process_reap(void (*other)(pid_t pid, int wstatus))
{
    int wstatus;
    pid_t pid;
    while ((pid = waitpid(-1, &wstatus, WNOHANG)) > 0) {
        struct stream *s = stream_by_pid(pid);
        if (s)
            reaped(s, wstatus);
        else
            other(pid, wstatus);
    }
}

void process_kill_all(void)
{
    kill(-1, SIGKILL); /* every process but PID 1 */
    uint64_t deadline = boottime_ns() + (uint64_t)KILL_WAIT_MS * 1000000u;
    for (;;) {
        pid_t pid = waitpid(-1, NULL, WNOHANG);
        if (pid < 0 || (pid == 0 && boottime_ns() > deadline))
            break; /* ECHILD: all reaped; or some are stuck in the kernel: power off regardless */
        if (pid == 0)
            sleep_ms(2);
    }
    for (size_t i = 0; i < ARRAY_LEN(streams); i++)
        if (streams[i].state != FREE)
            stream_free(&streams[i]);
}

/* --- frames and events --- */

static void on_signal(struct stream *s, const struct frame *fr)
{
    struct kp_signal m;
    struct failure f;
    if (kp_signal_decode(&m, fr->payload, fr->len, &f) < 0) /* SIGNO is required */
        fatal_failure(&f);
    log_debug("stream %u: signal %u to pid %d", s->id, m.signo, (int)s->pid);
    if (m.signo > 0 && m.signo < _NSIG && s->pid > 0)
        kill(s->pid, (int)m.signo); /* the process running now; ESRCH: it is exiting */
}

static void on_resize(struct stream *s, const struct frame *fr)
{
    struct kp_resize m;
    struct failure f;
    if (kp_resize_decode(&m, fr->payload, fr->len, &f) < 0)
        fatal_failure(&f);
    if (s->tty_fd < 0)
        return; /* not a terminal: nothing to resize */
    log_debug("stream %u: terminal %ux%u", s->id, m.tty_rows, m.tty_cols);
    if (pty_resize(s->tty_fd, m.tty_rows, m.tty_cols) < 0)
        log_debug("stream %u: TIOCSWINSZ: %s", s->id, strerror(errno));
}

void process_handle_frame(const struct frame *fr)
{
    if (fr->type == KP_MSG_START) {
        on_start(fr);
        return;
    }
    struct stream *s = stream_by_id(fr->stream);
    if (!s)
        return; /* the stream has ended: this frame crossed its EXIT (or ERROR) on the wire */
    switch (fr->type) {
    case KP_MSG_STDIN:
        on_stdin(s, fr);
        break;
    case KP_MSG_STDIN_EOF:
        s->in_eof = true;
        if (s->stdin_fd >= 0 && s->in.len == 0)
            close_stdin(s);
        break;
    case KP_MSG_SIGNAL:
        on_signal(s, fr);
        break;
    case KP_MSG_RESIZE:
        on_resize(s, fr);
        break;
    default:
        fatal("protocol", 0, "unexpected %s frame on stream %u", message_name(fr->type), fr->stream);
    }
}

enum fd_role { ROLE_REPORT, ROLE_STDIN, ROLE_STDOUT, ROLE_STDERR };

/* What each pollfd stands for; the stream id guards against a stream that ended (and whose
 * slot may have been reused) while the same poll round was being handled. */
static struct {
    struct stream *s;
    uint32_t id;
    enum fd_role role;
} refs[PROCESS_MAX_POLLFDS];

static size_t add_pollfd(struct pollfd *pfd, size_t n, size_t max, struct stream *s, int fd, short events,
                         enum fd_role role)
{
    if (fd < 0 || n >= max || n >= ARRAY_LEN(refs))
        return n;
    pfd[n] = (struct pollfd){.fd = fd, .events = events};
    refs[n].s = s;
    refs[n].id = s->id;
    refs[n].role = role;
    return n + 1;
}

size_t process_pollfds(struct pollfd *pfd, size_t max)
{
    size_t n = 0;
    for (size_t i = 0; i < ARRAY_LEN(streams); i++) {
        struct stream *s = &streams[i];
        if (s->state == FREE)
            continue;
        if (s->in.len > 0)
            n = add_pollfd(pfd, n, max, s, s->stdin_fd, POLLOUT, ROLE_STDIN);
        if (s->state == STARTING) {
            /* The main process's output waits for STARTED (a pre-start handler's came before). */
            n = add_pollfd(pfd, n, max, s, s->report_fd, POLLIN, ROLE_REPORT);
            continue;
        }
        n = add_pollfd(pfd, n, max, s, s->out_fd[OUT_STDOUT], POLLIN, ROLE_STDOUT);
        n = add_pollfd(pfd, n, max, s, s->out_fd[OUT_STDERR], POLLIN, ROLE_STDERR);
    }
    return n;
}

void process_handle_events(const struct pollfd *pfd, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct stream *s = refs[i].s;
        if (!pfd[i].revents || s->state == FREE || s->id != refs[i].id)
            continue;
        switch (refs[i].role) {
        case ROLE_REPORT:
            if (s->state == STARTING)
                resolve_start(s, false);
            break;
        case ROLE_STDIN:
            if (s->stdin_fd >= 0)
                stdin_flush(s);
            break;
        case ROLE_STDOUT:
            relay_output(s, OUT_STDOUT, KP_DATA_CHUNK, true);
            break;
        case ROLE_STDERR:
            relay_output(s, OUT_STDERR, KP_DATA_CHUNK, true);
            break;
        }
    }
}
