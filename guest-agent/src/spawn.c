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
    free(r->seccomp_errno);
    free(r->root_tag);
    free(r->rlimits);
    struct strv *lists[] = {&r->argv,           &r->envp,           &r->pre_start,      &r->post_stop,
                            &r->caps_retain,    &r->caps_remove,    &r->seccomp_retain, &r->seccomp_remove,
                            &r->mounts,         &r->rlimit_specs};
    for (size_t i = 0; i < ARRAY_LEN(lists); i++)
        strv_free(lists[i]);
    free(r->gids);
    seccomp_filter_free(&r->filter);
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

/* The list a repeated str field goes to. */
static struct strv *list_of(struct start_req *r, uint16_t tag)
{
    switch (tag) {
    case KP_F_ARG:
        return &r->argv;
    case KP_F_ENV:
        return &r->envp;
    case KP_F_PRE_START:
        return &r->pre_start;
    case KP_F_POST_STOP:
        return &r->post_stop;
    case KP_F_CAPS_RETAIN:
        return &r->caps_retain;
    case KP_F_CAPS_REMOVE:
        return &r->caps_remove;
    case KP_F_SECCOMP_RETAIN:
        return &r->seccomp_retain;
    case KP_F_VOLUME_MOUNT:
        return &r->mounts;
    case KP_F_RLIMIT:
        return &r->rlimit_specs;
    default:
        return &r->seccomp_remove;
    }
}

static int check_handler(const struct strv *argv, const char *name, struct failure *f)
{
    if (argv->n > 0 && argv->v[0][0] != '/')
        return failf(f, "request", EINVAL, "the %s handler needs an absolute path as its first argument", name);
    return 0;
}

/* The isolators, turned into what the children apply: a bounding set and a seccomp program. */
static int prepare_isolators(struct start_req *r, struct failure *f)
{
    if (r->caps_retain.n && r->caps_remove.n)
        return failf(f, "capabilities", EINVAL,
                     "os/linux/capabilities-retain-set and -remove-set cannot be used together");
    if (caps_bounding_set(r->caps_retain.n ? r->caps_retain.v : NULL, r->caps_remove.n ? r->caps_remove.v : NULL,
                          &r->cap_bounding, f) < 0)
        return -1;
    return seccomp_build(r->seccomp_retain.n ? r->seccomp_retain.v : NULL,
                         r->seccomp_remove.n ? r->seccomp_remove.v : NULL, r->seccomp_errno,
                         r->flags & KP_START_FLAG_SECCOMP_SKIP_UNKNOWN, &r->filter, f);
}

/* RLIMIT values ("RESOURCE SOFT HARD", decimal) into what the child applies; checked here, so that a
 * bad one fails the START rather than the child. */
static int parse_rlimits(struct start_req *r, struct failure *f)
{
    if (r->rlimit_specs.n == 0)
        return 0;
    if (!(r->rlimits = calloc(r->rlimit_specs.n, sizeof *r->rlimits)))
        out_of_memory();
    for (size_t i = 0; i < r->rlimit_specs.n; i++) {
        const char *spec = r->rlimit_specs.v[i];
        unsigned resource;
        unsigned long long soft, hard;
        int used = 0;
        if (sscanf(spec, "%u %llu %llu%n", &resource, &soft, &hard, &used) != 3 || spec[used] != '\0' ||
            resource >= RLIM_NLIMITS || soft > hard)
            return failf(f, "request", EINVAL, "bad RLIMIT %s", spec);
        r->rlimits[i] = (struct rlimit_set){.resource = (int)resource, .soft = soft, .hard = hard};
    }
    r->nrlimits = r->rlimit_specs.n;
    return 0;
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
        case KP_F_SECCOMP_ERRNO:
            set_once(&r->seccomp_errno, &field);
            break;
        case KP_F_ROOT_TAG:
            set_once(&r->root_tag, &field);
            break;
        case KP_F_OOM_SCORE_ADJ:
            r->has_oom_score_adj = true;
            r->oom_score_adj = (int32_t)tlv_u32(&field);
            break;
        case KP_F_ARG:
        case KP_F_ENV:
        case KP_F_PRE_START:
        case KP_F_POST_STOP:
        case KP_F_CAPS_RETAIN:
        case KP_F_CAPS_REMOVE:
        case KP_F_SECCOMP_RETAIN:
        case KP_F_SECCOMP_REMOVE:
        case KP_F_VOLUME_MOUNT:
        case KP_F_RLIMIT:
            if (strv_push(list_of(r, field.tag), field_str(&field)) < 0)
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
        case KP_F_TTY_ROWS:
            r->tty_rows = tlv_u32(&field);
            break;
        case KP_F_TTY_COLS:
            r->tty_cols = tlv_u32(&field);
            break;
        default: /* a field this agent does not know: skipped, as the protocol says */
            break;
        }
    }
    if (more < 0)
        fatal_failure(f);

    if (!r->app || !r->serial)
        return failf(f, "request", EINVAL, "START lacks APP_NAME or DISK_SERIAL");
    /* An entered command (or an OCI process: runc looks it up too) may be a bare name, looked up in
     * its PATH (exec_in_path). */
    bool lookup = r->flags & (KP_START_FLAG_ENTER | KP_START_FLAG_EXEC_PATH);
    if (r->argv.n == 0 || !r->argv.v[0][0] ||
        (r->argv.v[0][0] != '/' && !(lookup && !strchr(r->argv.v[0], '/'))))
        return failf(f, "request", EINVAL, "START needs an absolute path as its first ARG");
    if (r->workdir && r->workdir[0] != '/')
        return failf(f, "request", EINVAL, "working directory %s is not absolute", r->workdir);
    if (check_handler(&r->pre_start, "pre-start", f) < 0 || check_handler(&r->post_stop, "post-stop", f) < 0)
        return -1;
    if ((r->flags & KP_START_FLAG_ENTER) && (r->pre_start.n || r->post_stop.n))
        return failf(f, "request", EINVAL, "a process entering app %s has no event handlers", r->app);
    if (r->envp.n == 0 && strv_push(&r->envp, NULL) < 0) /* execve wants an array, even empty */
        out_of_memory();
    if (r->root_tag && strcmp(r->root_tag, r->serial) != 0)
        return failf(f, "request", EINVAL, "ROOT_TAG %s and DISK_SERIAL %s differ", r->root_tag, r->serial);
    if (r->has_oom_score_adj && (r->oom_score_adj < -1000 || r->oom_score_adj > 1000))
        return failf(f, "request", EINVAL, "OOM_SCORE_ADJ %d is outside -1000..1000", (int)r->oom_score_adj);
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
    if (setgroups(r->ngids, r->gids) < 0)
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
    const char *workdir = r->workdir ? r->workdir : "/";
    uid_t uid;
    gid_t gid;

    setsid(); /* its own session and process group, away from the agent's console */
    for (int i = 0; i < 3; i++)
        if (dup2(stdio[i], i) < 0)
            child_failf(report_fd, "exec", errno, "dup2: %s", strerror(errno));
    /* A terminal's stdout is the pty (an event handler's stdin is /dev/null): it becomes the
     * session's controlling terminal, so ^C, job control and SIGWINCH work as on a console. */
    if ((r->flags & KP_START_FLAG_TTY) && ioctl(STDOUT_FILENO, TIOCSCTTY, 0) < 0)
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
    if (r->has_oom_score_adj) {
        char value[16];
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        int n = snprintf(value, sizeof value, "%d", (int)r->oom_score_adj);
        if (fd < 0 || write(fd, value, (size_t)n) != n)
            child_failf(report_fd, "exec", errno, "oom_score_adj %d: %s", (int)r->oom_score_adj, strerror(errno));
        close(fd);
    }
    /* Names are looked up now, inside the app's root, in the app's own files. */
    if (resolve_user(r->user ? r->user : "0", &uid, &f) < 0 || resolve_group(r->group ? r->group : "0", &gid, &f) < 0)
        child_fail(report_fd, &f);
    /* The terminal belongs to its user, as login(1) does it, so reopening it by name works too. */
    if (r->flags & KP_START_FLAG_TTY)
        (void)!fchown(STDOUT_FILENO, uid, (gid_t)-1);
    become_app_user(r, uid, gid, report_fd);
    if ((r->flags & KP_START_FLAG_NO_NEW_PRIVS) && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        child_failf(report_fd, "exec", errno, "PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
    reset_signals();
    umask(022); /* the agent itself runs with 0 */
    /* Last: from here on, only the syscalls the filter allows work. */
    if (seccomp_install(&r->filter, &f) < 0)
        child_fail(report_fd, &f);
    if (strchr(argv[0], '/'))
        execve(argv[0], argv, r->envp.v);
    else
        exec_in_path(argv, r->envp.v);
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
