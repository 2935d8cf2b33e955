/* The metadata service's connections, in the service process: non-blocking, one request each
 * (Connection: close), answered by metadata_api from the store. */
#ifndef KVMPOD_METADATA_SERVER_H
#define KVMPOD_METADATA_SERVER_H

#include <stdnoreturn.h>

#include "metadata_store.h"

/* Serves `s` on `listen_fd` (a non-blocking listening socket), with `timer_fd` (a non-blocking
 * CLOCK_BOOTTIME timerfd) for the connections' deadlines, until `peer_fd` (PID 1's end of the
 * service's socketpair) hangs up; then exits. */
noreturn void metadata_serve(const struct md_store *s, int listen_fd, int timer_fd, int peer_fd);

#endif
