/* Terminals for START_FLAG_TTY processes: a pty pair from the app's own devpts instance. */
#ifndef KVMPOD_PTY_H
#define KVMPOD_PTY_H

#include <stdint.h>

#include "spawn.h"
#include "util.h"

/* Opens a pty in the devpts instance mounted at <root>/dev/pts (the app's private one, so the
 * process sees its terminal as /dev/pts/N), sets its size (0: left as is) and fills *p like
 * spawn_pipes() does: the agent's ends are the master (stdin_fd and stdout_fd, non-blocking;
 * stderr_fd -1: a terminal has one output), the children's ends the slave. *master is one more
 * copy of the master, kept for RESIZE. Returns -1 with *f (stage "tty") on failure. */
int pty_open(const char *root, uint32_t rows, uint32_t cols, struct stream_pipes *p, int *master, struct failure *f);

/* TIOCSWINSZ: the kernel sends SIGWINCH to the terminal's foreground process group. */
int pty_resize(int master, uint32_t rows, uint32_t cols);

#endif
