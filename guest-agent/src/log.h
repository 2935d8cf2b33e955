/* Diagnostics: LOG frames (kvmpod.debug=1) and fatal errors (kernel log + ERROR on stream 0). */
#ifndef KVMPOD_LOG_H
#define KVMPOD_LOG_H

#include <stdbool.h>
#include <stdnoreturn.h>

#include "util.h"

/* Opens /dev/kmsg; call once devtmpfs is mounted. Before that, fatal errors go to fd 2. */
void log_open_kmsg(void);

void log_set_debug(bool on);
bool log_is_debug(void);

/* A LOG frame when debugging. Lines logged before the handshake are kept and sent right after
 * it (nothing may precede HELLO_ACK). Only the agent process may call this, never a child. */
void log_debug(const char *fmt, ...) PRINTF(1, 2);

/* A LOG frame whether debugging or not, for what the host should always get to know (a failed
 * post-stop handler). Dropped before the handshake. Agent process only. */
void log_info(const char *fmt, ...) PRINTF(1, 2);

/* The handshake is done: send the kept lines, and send new ones at once. */
void log_channel_ready(void);

/* The agent cannot go on: write `kvmpod-agent: error: <stage>: <message>` to the kernel log at
 * priority 3 (the serial console shows it even with `quiet`), send ERROR on stream 0 if the
 * channel is up, and power off. */
noreturn void fatal(const char *stage, int err, const char *fmt, ...) PRINTF(3, 4);
noreturn void fatal_failure(const struct failure *f);

#endif
