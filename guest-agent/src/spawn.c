#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "protocol.h"
#include "tlv.h"
#include "users.h"

static void out_of_memory(void)
{
    fatal("request", ENOMEM, "out of memory");
}

/* --- START requests --- */

static int strv_push(struct strv *s, char *str)
{
    if (s->n + 2 > s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 8;
        char **grown = realloc(s->v, cap * sizeof *grown);
        if (!grown)
            return -1;
        s->v = grown;
        s->cap = cap;
    }
    s->v[s->n++] = str;
    s->v[s->n] = NULL;
    return 0;
}

static void strv_free(struct strv *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i]);
    free(s->v);
}

void start_req_free(struct start_req *r)
{
    free(r->app);
    free(r->serial);
    free(r->workdir);
    free(r->user);
    free(r->group);
    strv_free(&r->argv);
    strv_free(&r->envp);
    free(r->gids);
}

/* A str field as a C string. A malformed field is a protocol error: fatal. */
static char *field_str(const struct tlv_field *field)
{
    struct failure f;
    char *s = tlv_strdup(field, &f);
    if (!s)
        fatal_failure(&f);
    return s;
}

/* Single-valued fields: the first one counts (as on the host side). */
static void set_once(char **dst, const struct tlv_field *field)
{
    if (!*dst)
        *dst = field_str(field);
}

int start_req_parse(struct start_req *r, const uint8_t *payload, size_t len, struct failure *f)
{
    struct tlv_reader rd;
    struct tlv_field field;
    int more;
    tlv_reader_init(&rd, payload, len);
    while ((more = tlv_next(&rd, &field, f)) > 0) {
        switch (field.tag) {
        case KP_F_APP_NAME:
            set_once(&r->app, &field);
            break;
        case KP_F_DISK_SERIAL:
            set_once(&r->serial, &field);
            break;
        case KP_F_WORKDIR:
            set_once(&r->workdir, &field);
            break;
        case KP_F_USER:
            set_once(&r->user, &field);
            break;
        case KP_F_GROUP:
            set_once(&r->group, &field);
            break;
        case KP_F_ARG:
            if (strv_push(&r->argv, field_str(&field)) < 0)
                out_of_memory();
            break;
        case KP_F_ENV:
            if (strv_push(&r->envp, field_str(&field)) < 0)
                out_of_memory();
            break;
        case KP_F_SUPP_GID: {
            gid_t *grown = realloc(r->gids, (r->ngids + 1) * sizeof *grown);
            if (!grown)
                out_of_memory();
            r->gids = grown;
            r->gids[r->ngids++] = (gid_t)tlv_u32(&field);
            break;
        }
        case KP_F_START_FLAGS:
            r->flags = tlv_u32(&field);
            break;
        default: /* a field this agent does not know: skipped, as the protocol says */
            break;
        }
    }
    if (more < 0)
        fatal_failure(f);

    if (!r->app || !r->serial)
        return failf(f, "request", EINVAL, "START lacks APP_NAME or DISK_SERIAL");
    if (r->argv.n == 0 || r->argv.v[0][0] != '/')
        return failf(f, "request", EINVAL, "START needs an absolute path as its first ARG");
    if (r->workdir && r->workdir[0] != '/')
        return failf(f, "request", EINVAL, "working directory %s is not absolute", r->workdir);
    if (r->envp.n == 0 && strv_push(&r->envp, NULL) < 0) /* execve wants an array, even empty */
        out_of_memory();
    return 0;
}

/* --- the child: from fork to exec --- */

/* Sent by the child through a close-on-exec pipe when its setup fails; EOF means exec worked. */
struct child_report {
    uint32_t stage; /* index in CHILD_STAGES */
    int32_t err;
    char msg[256];
};

/* The stages a child can fail in; the first is the fallback. */
static const char *const CHILD_STAGES[] = {"exec", "rootfs", "workdir", "user", "group"};

static noreturn void child_fail(int report_fd, const struct failure *f)
{
    struct child_report r = {.err = f->err};
    for (uint32_t i = 0; i < ARRAY_LEN(CHILD_STAGES); i++)
        if (strcmp(f->stage, CHILD_STAGES[i]) == 0)
            r.stage = i;
    snprintf(r.msg, sizeof r.msg, "%s", f->msg);
    (void)!write(report_fd, &r, sizeof r); /* smaller than PIPE_BUF: one atomic write */
    _exit(127);
}

static noreturn PRINTF(4, 5) void child_failf(int report_fd, const char *stage, int err, const char *fmt, ...)
{
    struct failure f;
    va_list ap;
    va_start(ap, fmt);
    vfailf(&f, stage, err, fmt, ap);
    va_end(ap);
    child_fail(report_fd, &f);
}

static void reset_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    for (int sig = 1; sig < _NSIG; sig++)
        signal(sig, SIG_DFL); /* SIG_IGN survives exec; handlers do not matter, there are none */
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static noreturn void child_exec(const struct start_req *r, const char *root, const int stdio[3], int report_fd)
{
    struct failure f;
    const char *workdir = r->workdir ? r->workdir : "/";
    uid_t uid;
    gid_t gid;

    setsid(); /* its own session and process group, away from the agent's console */
    for (int i = 0; i < 3; i++)
        if (dup2(stdio[i], i) < 0)
            child_failf(report_fd, "exec", errno, "dup2: %s", strerror(errno));
    if (chroot(root) < 0)
        child_failf(report_fd, "rootfs", errno, "chroot %s: %s", root, strerror(errno));
    if (chdir(workdir) < 0) {
        int e = errno;
        if (e == ENOENT)
            child_failf(report_fd, "workdir", e, "working directory %s does not exist", workdir);
        child_failf(report_fd, "workdir", e, "working directory %s: %s", workdir, strerror(e));
    }
    /* Names are looked up now, inside the app's root, in the app's own files. */
    if (resolve_user(r->user ? r->user : "0", &uid, &f) < 0 || resolve_group(r->group ? r->group : "0", &gid, &f) < 0)
        child_fail(report_fd, &f);
    if (setgroups(r->ngids, r->gids) < 0)
        child_failf(report_fd, "group", errno, "setgroups: %s", strerror(errno));
    if (setgid(gid) < 0)
        child_failf(report_fd, "group", errno, "setgid %u: %s", (unsigned)gid, strerror(errno));
    if (setuid(uid) < 0)
        child_failf(report_fd, "user", errno, "setuid %u: %s", (unsigned)uid, strerror(errno));
    reset_signals();
    umask(022); /* the agent itself runs with 0 */
    execve(r->argv.v[0], r->argv.v, r->envp.v);
    child_failf(report_fd, "exec", errno, "exec %s: %s", r->argv.v[0], strerror(errno));
}

/* --- the agent's side --- */

/* A pipe whose end `ours` (0 read, 1 write) is the agent's, non-blocking: the event loop must
 * never stall on one process. The child's end stays blocking. Both are close-on-exec. */
static int make_pipe(int fds[2], int ours)
{
    if (pipe2(fds, O_CLOEXEC) < 0)
        return -1;
    if (set_nonblocking(fds[ours]) < 0) {
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    return 0;
}

static void close_pair(int fds[2])
{
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

int spawn(const struct start_req *r, const char *root, struct spawned *out, struct failure *f)
{
    int in[2] = {-1, -1}, stdout_pipe[2] = {-1, -1}, stderr_pipe[2] = {-1, -1}, report[2] = {-1, -1};
    pid_t pid = -1;

    if (r->flags & KP_START_FLAG_STDIN) {
        if (make_pipe(in, 1) < 0)
            goto fail;
    } else if ((in[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
        goto fail;
    }
    if (make_pipe(stdout_pipe, 0) < 0 || make_pipe(stderr_pipe, 0) < 0 || make_pipe(report, 0) < 0)
        goto fail;
    if ((pid = fork()) < 0)
        goto fail;
    if (pid == 0) {
        const int stdio[3] = {in[0], stdout_pipe[1], stderr_pipe[1]};
        child_exec(r, root, stdio, report[1]);
    }
    *out = (struct spawned){.pid = pid, .stdin_fd = in[1], .stdout_fd = stdout_pipe[0],
                            .stderr_fd = stderr_pipe[0], .report_fd = report[0]};
    /* The child's ends are the child's now. */
    close(in[0]);
    close(stdout_pipe[1]);
    close(stderr_pipe[1]);
    close(report[1]);
    return 0;

fail:
    failf(f, "exec", errno, "cannot start %s: %s", r->argv.v[0], strerror(errno));
    close_pair(in);
    close_pair(stdout_pipe);
    close_pair(stderr_pipe);
    close_pair(report);
    return -1;
}

int spawn_result(int report_fd, bool child_gone, struct failure *f)
{
    struct child_report rep;
    ssize_t n = read(report_fd, &rep, sizeof rep);
    if (n < 0 && (errno == EAGAIN || errno == EINTR) && !child_gone)
        return 0;
    if (n <= 0)
        return 1; /* EOF: exec closed the pipe (a failed read of our own pipe cannot happen) */
    if (n != sizeof rep)
        return failf(f, "exec", 0, "the process failed to start (short report)");
    rep.msg[sizeof rep.msg - 1] = '\0';
    return failf(f, CHILD_STAGES[rep.stage < ARRAY_LEN(CHILD_STAGES) ? rep.stage : 0], rep.err, "%s", rep.msg);
}
