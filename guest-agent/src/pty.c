#include "pty.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <termios.h>
#include <unistd.h>

#ifndef TIOCGPTPEER /* Linux 4.13; musl's headers may lack it */
#define TIOCGPTPEER _IO('T', 0x41)
#endif

#define PTMX_MAJOR 5
#define PTMX_MINOR 2
#define TTY_MAX_SIZE 0xffffu /* struct winsize holds unsigned shorts */

int pty_resize(int master, uint32_t rows, uint32_t cols)
{
    if (rows == 0 || cols == 0)
        return 0;
    struct winsize ws = {.ws_row = (unsigned short)(rows > TTY_MAX_SIZE ? TTY_MAX_SIZE : rows),
                         .ws_col = (unsigned short)(cols > TTY_MAX_SIZE ? TTY_MAX_SIZE : cols)};
    return ioctl(master, TIOCSWINSZ, &ws);
}

/* <root>/dev/pts/ptmx, refusing anything but the ptmx node of a devpts instance (the app could
 * have replaced its /dev/pts). */
static int open_master(const char *root, struct failure *f)
{
    char path[PATH_MAX];
    struct stat st;
    if (path_join(path, sizeof path, "%s/dev/pts/ptmx", root) < 0)
        return failf(f, "tty", ENAMETOOLONG, "app path too long");
    int fd = open(path, O_RDWR | O_NOCTTY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return failf(f, "tty", errno, "open /dev/pts/ptmx in the app's root: %s", strerror(errno));
    if (fstat(fd, &st) < 0 || !S_ISCHR(st.st_mode) || major(st.st_rdev) != PTMX_MAJOR ||
        minor(st.st_rdev) != PTMX_MINOR) {
        close(fd);
        return failf(f, "tty", ENOTTY, "/dev/pts/ptmx in the app's root is not a pty multiplexer");
    }
    return fd;
}

static int dup_cloexec(int fd)
{
    return fcntl(fd, F_DUPFD_CLOEXEC, 3);
}

int pty_open(const char *root, uint32_t rows, uint32_t cols, struct stream_pipes *p, int *master, struct failure *f)
{
    int unlock = 0, m = open_master(root, f), s = -1;
    int fds[4] = {-1, -1, -1, -1}; /* stdin_fd, stdout_fd, child_out, child_err */
    if (m < 0)
        return -1;
    if (ioctl(m, TIOCSPTLCK, &unlock) < 0 || (s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
        failf(f, "tty", errno, "cannot open the pty's terminal: %s", strerror(errno));
        goto fail;
    }
    if (pty_resize(m, rows, cols) < 0 || set_nonblocking(m) < 0) {
        failf(f, "tty", errno, "cannot set up the pty: %s", strerror(errno));
        goto fail;
    }
    if ((fds[0] = dup_cloexec(m)) < 0 || (fds[1] = dup_cloexec(m)) < 0 || (fds[2] = dup_cloexec(s)) < 0 ||
        (fds[3] = dup_cloexec(s)) < 0) {
        failf(f, "tty", errno, "cannot set up the pty: %s", strerror(errno));
        goto fail;
    }
    *p = (struct stream_pipes){.stdin_fd = fds[0], .stdout_fd = fds[1], .stderr_fd = -1,
                               .child_in = s, .child_out = fds[2], .child_err = fds[3]};
    *master = m;
    return 0;

fail:
    for (size_t i = 0; i < ARRAY_LEN(fds); i++)
        if (fds[i] >= 0)
            close(fds[i]);
    if (s >= 0)
        close(s);
    close(m);
    return -1;
}
