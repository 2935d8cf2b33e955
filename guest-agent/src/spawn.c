#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "caps.h"
#include "log.h"
#include "protocol.h"
#include "users.h"

static void out_of_memory(void)
{
    fatal("request", ENOMEM, "out of memory");
}

/* --- START requests --- */

void start_req_free(struct start_req *r)
{
    kp_start_free(&r->msg);
    free(r->rlimits);
    seccomp_filter_free(&r->filter);
}

static int check_handler(const struct kp_strs *argv, const char *name, struct failure *f)
{
    if (argv->n > 0 && argv->v[0][0] != '/')
        return failf(f, "request", EINVAL, "the %s handler needs an absolute path as its first argument", name);
    return 0;
}

/* The isolators, turned into what the children apply: a bounding set and a seccomp program. */
static int prepare_isolators(struct start_req *r, struct failure *f)
{
    const struct kp_start *m = &r->msg;
    if (m->caps_retain.n && m->caps_remove.n)
        return failf(f, "capabilities", EINVAL,
                     "os/linux/capabilities-retain-set and -remove-set cannot be used together");
    /* An empty list's v is NULL: the isolator is absent. */
    if (caps_bounding_set(m->caps_retain.v, m->caps_remove.v, &r->cap_bounding, f) < 0)
        return -1;
    return seccomp_build(m->seccomp_retain.v, m->seccomp_remove.v, m->seccomp_errno,
                         m->start_flags & KP_START_FLAG_SECCOMP_SKIP_UNKNOWN, &r->filter, f);
}

/* RLIMIT values ("RESOURCE SOFT HARD", decimal) into what the child applies; checked here, so that a
 * bad one fails the START rather than the child. */
static int parse_rlimits(struct start_req *r, struct failure *f)
{
    const struct kp_strs *specs = &r->msg.rlimit;
    if (specs->n == 0)
        return 0;
    if (!(r->rlimits = calloc(specs->n, sizeof *r->rlimits)))
        out_of_memory();
    for (size_t i = 0; i < specs->n; i++) {
        const char *spec = specs->v[i];
        unsigned resource;
        unsigned long long soft, hard;
        int used = 0;
        if (sscanf(spec, "%u %llu %llu%n", &resource, &soft, &hard, &used) != 3 || spec[used] != '\0' ||
            resource >= RLIM_NLIMITS || soft > hard)
            return failf(f, "request", EINVAL, "bad RLIMIT %s", spec);
        r->rlimits[i] = (struct rlimit_set){.resource = (int)resource, .soft = soft, .hard = hard};
    }
    r->nrlimits = specs->n;
    return 0;
}

int start_req_parse(struct start_req *r, const uint8_t *payload, size_t len, struct failure *f)
{
    static char *no_env[] = {NULL}; /* execve wants an array, even empty */
    if (kp_start_decode(&r->msg, payload, len, f) < 0) {
        if (f->err == ENOMEM)
            out_of_memory();
        fatal_failure(f); /* it breaks protocol.toml's START (a field's size, a missing APP_NAME...) */
    }
    const struct kp_start *m = &r->msg;
    r->envp = m->env.n ? m->env.v : no_env;
    /* An entered command (or an OCI process: runc looks it up too) may be a bare name, looked up in
     * its PATH (exec_in_path). */
    bool lookup = m->start_flags & (KP_START_FLAG_ENTER | KP_START_FLAG_EXEC_PATH);
    if (m->arg.n == 0 || !m->arg.v[0][0] || (m->arg.v[0][0] != '/' && !(lookup && !strchr(m->arg.v[0], '/'))))
        return failf(f, "request", EINVAL, "START needs an absolute path as its first ARG");
    if (m->workdir && m->workdir[0] != '/')
        return failf(f, "request", EINVAL, "working directory %s is not absolute", m->workdir);
    if (check_handler(&m->pre_start, "pre-start", f) < 0 || check_handler(&m->post_stop, "post-stop", f) < 0)
        return -1;
    if ((m->start_flags & KP_START_FLAG_ENTER) && (m->pre_start.n || m->post_stop.n))
        return failf(f, "request", EINVAL, "a process entering app %s has no event handlers", m->app_name);
    if (m->root_tag && strcmp(m->root_tag, m->disk_serial) != 0)
        return failf(f, "request", EINVAL, "ROOT_TAG %s and DISK_SERIAL %s differ", m->root_tag, m->disk_serial);
    if (m->has_oom_score_adj && (m->oom_score_adj < -1000 || m->oom_score_adj > 1000))
        return failf(f, "request", EINVAL, "OOM_SCORE_ADJ %d is outside -1000..1000", (int)m->oom_score_adj);
    if (parse_rlimits(r, f) < 0)
        return -1;
    return prepare_isolators(r, f);
}

/* --- the child: from fork to exec --- */

/* Sent by the child through a close-on-exec pipe when its setup fails; EOF means exec worked. */
struct child_report {
    uint32_t stage; /* index in CHILD_STAGES */
    int32_t err;
    char msg[256];
};

/* The stages a child can fail in; the first is the fallback. */
static const char *const CHILD_STAGES[] = {"exec", "rootfs", "workdir", "user", "group", "capabilities", "seccomp",
                                            "tty"};

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

/* Changes to the app's user and groups with the app's capabilities: the bounding set first (that
 * needs CAP_SETPCAP, which only root has), then the ids, then the remaining sets. */
static void become_app_user(const struct start_req *r, uid_t uid, gid_t gid, int report_fd)
{
    struct failure f;
    bool filter = r->filter.insns != NULL;
    if (caps_prepare(r->cap_bounding, uid, filter, &f) < 0)
        child_fail(report_fd, &f);
    if (setgroups(r->msg.supp_gid.n, r->msg.supp_gid.v) < 0)
        child_failf(report_fd, "group", errno, "setgroups: %s", strerror(errno));
    if (setgid(gid) < 0)
        child_failf(report_fd, "group", errno, "setgid %u: %s", (unsigned)gid, strerror(errno));
    if (setuid(uid) < 0)
        child_failf(report_fd, "user", errno, "setuid %u: %s", (unsigned)uid, strerror(errno));
    if (caps_finish(r->cap_bounding, uid, filter, &f) < 0)
        child_fail(report_fd, &f);
}

/* The appc executor's PATH, for an environment without one. */
static const char DEFAULT_PATH[] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/* execve of a command without a slash: tried in each directory of the process's own PATH (not
 * the agent's, as execvp would), like a shell. Returns with errno set: the most telling failure. */
static void exec_in_path(char *const *argv, char *const *envp)
{
    const char *path = DEFAULT_PATH;
    char candidate[PATH_MAX];
    int err = ENOENT;
    for (char *const *e = envp; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) {
            path = *e + 5;
            break;
        }
    for (const char *dir = path; *dir;) {
        size_t len = strcspn(dir, ":");
        int n = snprintf(candidate, sizeof candidate, "%.*s/%s", len ? (int)len : 1, len ? dir : ".", argv[0]);
        if (n > 0 && (size_t)n < sizeof candidate) {
            execve(candidate, argv, envp);
            if (errno != ENOENT && errno != ENOTDIR)
                err = errno; /* EACCES and the like: found but not runnable */
        }
        dir += len;
        if (*dir == ':')
            dir++;
    }
    errno = err;
}

static noreturn void child_exec(const struct start_req *r, char *const *argv, const char *root, const int stdio[3],
                                int report_fd)
{
    struct failure f;
    const char *workdir = r->msg.workdir ? r->msg.workdir : "/";
    uid_t uid;
    gid_t gid;

    setsid(); /* its own session and process group, away from the agent's console */
    for (int i = 0; i < 3; i++)
        if (dup2(stdio[i], i) < 0)
            child_failf(report_fd, "exec", errno, "dup2: %s", strerror(errno));
    /* A terminal's stdout is the pty (an event handler's stdin is /dev/null): it becomes the
     * session's controlling terminal, so ^C, job control and SIGWINCH work as on a console. */
    if ((r->msg.start_flags & KP_START_FLAG_TTY) && ioctl(STDOUT_FILENO, TIOCSCTTY, 0) < 0)
        child_failf(report_fd, "tty", errno, "cannot make the pty the controlling terminal: %s", strerror(errno));
    if (chroot(root) < 0)
        child_failf(report_fd, "rootfs", errno, "chroot %s: %s", root, strerror(errno));
    if (chdir(workdir) < 0) {
        int e = errno;
        if (e == ENOENT)
            child_failf(report_fd, "workdir", e, "working directory %s does not exist", workdir);
        child_failf(report_fd, "workdir", e, "working directory %s: %s", workdir, strerror(e));
    }
    /* Limits and the OOM score while still root: raising a hard limit or lowering the score needs
     * CAP_SYS_RESOURCE, which the app's user may not have. */
    for (size_t i = 0; i < r->nrlimits; i++) {
        struct rlimit lim = {.rlim_cur = (rlim_t)r->rlimits[i].soft, .rlim_max = (rlim_t)r->rlimits[i].hard};
        if (setrlimit(r->rlimits[i].resource, &lim) < 0)
            child_failf(report_fd, "exec", errno, "setrlimit %d: %s", r->rlimits[i].resource, strerror(errno));
    }
    if (r->msg.has_oom_score_adj) {
        char value[16];
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        int n = snprintf(value, sizeof value, "%d", (int)r->msg.oom_score_adj);
        if (fd < 0 || write(fd, value, (size_t)n) != n)
            child_failf(report_fd, "exec", errno, "oom_score_adj %d: %s", (int)r->msg.oom_score_adj, strerror(errno));
        close(fd);
    }
    /* Names are looked up now, inside the app's root, in the app's own files. */
    if (resolve_user(r->msg.user ? r->msg.user : "0", &uid, &f) < 0 || resolve_group(r->msg.group ? r->msg.group : "0", &gid, &f) < 0)
        child_fail(report_fd, &f);
    /* The terminal belongs to its user, as login(1) does it, so reopening it by name works too. */
    if (r->msg.start_flags & KP_START_FLAG_TTY)
        (void)!fchown(STDOUT_FILENO, uid, (gid_t)-1);
    become_app_user(r, uid, gid, report_fd);
    if ((r->msg.start_flags & KP_START_FLAG_NO_NEW_PRIVS) && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        child_failf(report_fd, "exec", errno, "PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
    reset_signals();
    umask(022); /* the agent itself runs with 0 */
    /* Last: from here on, only the syscalls the filter allows work. */
    if (seccomp_install(&r->filter, &f) < 0)
        child_fail(report_fd, &f);
    if (strchr(argv[0], '/'))
        execve(argv[0], argv, r->envp);
    else
        exec_in_path(argv, r->envp);
    child_failf(report_fd, "exec", errno, "exec %s: %s", argv[0], strerror(errno));
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

int spawn_pipes(bool with_stdin, struct stream_pipes *p, struct failure *f)
{
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
    if (with_stdin) {
        if (make_pipe(in, 1) < 0)
            goto fail;
    } else if ((in[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
        goto fail;
    }
    if (make_pipe(out, 0) < 0 || make_pipe(err, 0) < 0)
        goto fail;
    *p = (struct stream_pipes){.stdin_fd = in[1], .stdout_fd = out[0], .stderr_fd = err[0],
                               .child_in = in[0], .child_out = out[1], .child_err = err[1]};
    return 0;

fail:
    failf(f, "exec", errno, "cannot make the process's pipes: %s", strerror(errno));
    close_pair(in);
    close_pair(out);
    close_pair(err);
    return -1;
}

int spawn(const struct start_req *r, char *const *argv, const char *root, const int stdio[3], struct spawned *out,
          struct failure *f)
{
    int report[2] = {-1, -1}, null_fd = -1;
    int child_stdio[3] = {stdio[0], stdio[1], stdio[2]};
    pid_t pid;

    if (child_stdio[0] < 0 && (child_stdio[0] = null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
        goto fail;
    if (make_pipe(report, 0) < 0 || (pid = fork()) < 0)
        goto fail;
    if (pid == 0)
        child_exec(r, argv, root, child_stdio, report[1]);
    *out = (struct spawned){.pid = pid, .report_fd = report[0]};
    close(report[1]);
    if (null_fd >= 0)
        close(null_fd);
    return 0;

fail:
    failf(f, "exec", errno, "cannot start %s: %s", argv[0], strerror(errno));
    close_pair(report);
    if (null_fd >= 0)
        close(null_fd);
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
