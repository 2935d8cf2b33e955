/* START: the request, and the processes it makes (fork, then set up and exec in the child): the
 * app's main process and its pre-start and post-stop event handlers. */
#ifndef KVMPOD_SPAWN_H
#define KVMPOD_SPAWN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "messages.h"
#include "seccomp.h"
#include "util.h"

struct start_req {
    /* The START as decoded (messages.h): absent WORKDIR, USER, GROUP are NULL (defaults "/", "0",
     * "0"), START_FLAGS 0; PRE_START, POST_STOP n == 0: no handler; ROOT_TAG NULL: the root is a
     * disk; SECCOMP_ERRNO NULL or "": SIGSYS; TTY_ROWS/COLS 0: not given. */
    struct kp_start msg;
    char **envp; /* msg.env, or an empty list: execve wants one */
    /* Made from the above by start_req_parse(): */
    uint64_t cap_bounding;
    struct rlimit_set {
        int resource;
        uint64_t soft, hard;
    } *rlimits;
    size_t nrlimits;
    struct seccomp_filter filter;
};

/* Decodes a START payload and prepares its isolators. A malformed payload is a protocol error
 * (fatal); a missing or bad field returns -1 with *f (stage "request", "capabilities" or
 * "seccomp"). Free with start_req_free() either way. */
int start_req_parse(struct start_req *r, const uint8_t *payload, size_t len, struct failure *f);
void start_req_free(struct start_req *r);

/* A stream's pipes. The agent's ends (stdin_fd: -1 without START_FLAG_STDIN; stdout_fd,
 * stderr_fd) are non-blocking; the children's ends (child_in: the stdin pipe or /dev/null,
 * child_out, child_err) are kept by the agent until the stream's last process is forked, so
 * the event handlers and the main process write to the same stdout and stderr. */
struct stream_pipes {
    int stdin_fd, stdout_fd, stderr_fd;
    int child_in, child_out, child_err;
};

int spawn_pipes(bool with_stdin, struct stream_pipes *p, struct failure *f);

/* A forked process and its setup report pipe. */
struct spawned {
    pid_t pid;
    int report_fd;
};

/* Forks a process of the app of `r` running `argv` chrooted in `root`, with stdio[3] as its
 * stdin, stdout and stderr (stdin -1: /dev/null). The child sets itself up (session, stdio, with
 * START_FLAG_TTY its controlling terminal (stdout, a pty) owned by its user, root, working
 * directory, user and groups, capabilities, no_new_privs, signals, seccomp) and execs;
 * spawn_result() tells how that went. */
int spawn(const struct start_req *r, char *const *argv, const char *root, const int stdio[3], struct spawned *out,
          struct failure *f);

/* Reads the outcome of the child's setup from its report pipe: 1 when it exec'd (EOF), 0 when not
 * known yet, -1 with *f (stage exec, rootfs, workdir, user, group, capabilities, seccomp or tty) when
 * setup failed. The caller closes the pipe once the result is known. `child_gone`: the child has
 * been reaped, so the outcome is there to read. */
int spawn_result(int report_fd, bool child_gone, struct failure *f);

#endif
