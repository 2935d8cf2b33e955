/* The metadata service process (docs/metadata.md, "Privilege separation"). PID 1 forks and execs its own
 * binary as METADATA_SERVICE_NAME with the fds below; the process drops every privilege, confines itself
 * with a seccomp filter, loads the documents PID 1 checked and serves HTTP until PID 1 lets it go. */
#ifndef KVMPOD_METADATA_SERVICE_H
#define KVMPOD_METADATA_SERVICE_H

#include <stdnoreturn.h>

#include "util.h"

#define METADATA_SERVICE_NAME "kvmpod-metadata" /* argv[0] and the process name (15 characters: comm's max) */
/* Its own user and group: below 65534 (nobody, the kernel's overflow id, which images use) and above what
 * distributions allocate (system ids, users 1000-60000, systemd's dynamic 61184-65519). */
#define METADATA_SERVICE_UID 65533
#define METADATA_SERVICE_GID 65533
#define METADATA_SERVICE_ROOT "/run/kvmpod-metadata" /* an empty directory: its root */

/* The fds it starts with; 0-2 are /dev/null. */
enum {
    MD_FD_PEER = 3,       /* its end of the socketpair with PID 1 (SOCK_SEQPACKET) */
    MD_FD_LISTEN = 4,     /* the listening socket PID 1 bound */
    MD_FD_TRANSCRIPT = 5, /* read-only: the sealed memfd of the frames (below) */
    MD_FD_COUNT
};

/* The transcript: the METADATA and METADATA_START frames PID 1 accepted, in order, each as a record of
 * u16 type, u32 payload length (little endian) and the payload. */
#define MD_RECORD_HEAD 6

/* Exit codes besides 0 (PID 1 closed the socketpair). */
enum {
    MD_EXIT_SETUP = 2,  /* it could not start (before READY): the same would happen again */
    MD_EXIT_FAILED = 3, /* it could not go on */
};

/* Messages to PID 1 (it never sends any back): a kind byte, then at most MD_MSG_MAX bytes of text. */
enum { MD_MSG_DEBUG = 'd', MD_MSG_ERROR = 'e', MD_MSG_READY = 'r' };
#define MD_MSG_MAX 200

/* The service's main; never returns. */
noreturn void metadata_service_main(int argc, char **argv);

/* A debug line for PID 1 to log (kvmpod.debug=1 only); dropped rather than waited for. */
void service_debug(const char *fmt, ...) PRINTF(1, 2);

#endif
