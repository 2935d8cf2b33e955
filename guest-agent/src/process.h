/* The app processes: one per process stream, from START to EXIT. */
#ifndef KVMPOD_PROCESS_H
#define KVMPOD_PROCESS_H

#include <poll.h>
#include <stddef.h>

#include "channel.h"
#include "protocol.h"

/* Most fds the processes add to the event loop's poll set. */
#define PROCESS_MAX_POLLFDS (KP_MAX_STREAMS * 4)

/* START, STDIN, STDIN_EOF or SIGNAL from the host. */
void process_handle_frame(const struct frame *f);

/* Fills pfd with the fds the processes wait on; returns how many. */
size_t process_pollfds(struct pollfd *pfd, size_t max);

/* Acts on the results of poll() for the fds process_pollfds() gave. */
void process_handle_events(const struct pollfd *pfd, size_t n);

/* After SIGCHLD: reaps every exited child. A stream's process gets its remaining output and
 * EXIT sent; any other child (the metadata service, orphans re-parented to PID 1) goes to `other`. */
void process_reap(void (*other)(pid_t pid, int wstatus));

/* Shutdown: SIGKILL every process in the guest and reap them (no EXIT frames are sent). */
void process_kill_all(void);

#endif
