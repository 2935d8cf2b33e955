/* START: the request, and the process it makes (fork, then set up and exec in the child). */
#ifndef KVMPOD_SPAWN_H
#define KVMPOD_SPAWN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "util.h"

struct strv {
    char **v; /* NULL-terminated once non-empty */
    size_t n, cap;
};

struct start_req {
    char *app, *serial, *workdir, *user, *group; /* NULL: not given (defaults "/", "0", "0") */
    struct strv argv, envp;
    gid_t *gids;
    size_t ngids;
    uint32_t flags;
};

/* Decodes a START payload. A malformed one is a protocol error (fatal); a missing or bad field
 * returns -1 with *f (stage "request"). Free with start_req_free() either way. */
int start_req_parse(struct start_req *r, const uint8_t *payload, size_t len, struct failure *f);
void start_req_free(struct start_req *r);

/* The agent's ends of a forked process: stdin (-1 without START_FLAG_STDIN), stdout and stderr,
 * all non-blocking, and the child's setup report pipe. */
struct spawned {
    pid_t pid;
    int stdin_fd, stdout_fd, stderr_fd, report_fd;
};

/* Forks the process of `r`, to run chrooted in `root`. The child sets itself up (session, stdio,
 * root, working directory, user and groups, signals) and execs; spawn_result() tells how that went. */
int spawn(const struct start_req *r, const char *root, struct spawned *out, struct failure *f);

/* Reads the outcome of the child's setup from its report pipe: 1 when it exec'd (EOF), 0 when not
 * known yet, -1 with *f (stage exec, rootfs, workdir, user or group) when setup failed. The
 * caller closes the pipe once the result is known. `child_gone`: the child has been reaped, so
 * the outcome is there to read. */
int spawn_result(int report_fd, bool child_gone, struct failure *f);

#endif
