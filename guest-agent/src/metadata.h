/* The appc metadata service (docs/metadata.md): its limits, and PID 1's side of it. PID 1 checks the
 * documents the host pushes at pod start (METADATA, METADATA_START), binds 127.0.0.1:PORT and runs the
 * service in a process of its own (metadata_service.h: its own user, no capabilities, a seccomp filter),
 * which it watches and restarts. PID 1 itself parses no HTTP. */
#ifndef KVMPOD_METADATA_H
#define KVMPOD_METADATA_H

#include <poll.h>
#include <stddef.h>
#include <sys/types.h>

#include "channel.h"
#include "protocol.h"

#define METADATA_MAX_CONNS 16       /* connections served at once; more wait in the listen backlog */
#define METADATA_MAX_POLLFDS 2      /* PID 1's: the service's socketpair, the restart timer */
#define METADATA_REQUEST_MAX 65536  /* a request's head and body together */
#define METADATA_HEAD_MAX 8192      /* its request line and header fields */
#define METADATA_FIELDS_MAX 64      /* its header fields */
#define METADATA_DOC_MAX KP_METADATA_DOC_MAX /* protocol.toml's metadata_doc_max (build/protocol.h) */
#define METADATA_RESTART_MS 1000u   /* a service that died after it was ready is started again this much later */

/* METADATA (a piece of a document) and METADATA_START (listen, then start the service). A frame that breaks
 * the rules of docs/agent-protocol.md is fatal (stage "protocol"); failing to listen or to start the
 * service, too ("metadata"). */
void metadata_handle_frame(const struct frame *f);

/* Brings the loopback interface up (once; the service listens there). A boot snapshot does it in
 * PREPARE, so pods restored from it do not spend the time. Fatal (stage "metadata") on failure. */
void metadata_loopback_up(void);

/* Fills pfd with the fds PID 1 waits on for the service; returns how many. */
size_t metadata_pollfds(struct pollfd *pfd, size_t max);

/* Acts on the results of poll() for the fds metadata_pollfds() gave. */
void metadata_handle_events(const struct pollfd *pfd, size_t n);

/* PID 1 reaped `pid`, which is no app's process: if it was the service, logs how it ended and restarts it
 * (fatal if it died before it was ready: it would again). */
void metadata_reaped(pid_t pid, int wstatus);

#endif
