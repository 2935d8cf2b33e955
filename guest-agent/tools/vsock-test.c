/* vsock-test: a guest program for kvmpod's vsock tests (tests/e2e/test_vsock.py), not part of the agent.
 *
 *   vsock-test echo HOSTPORT GUESTPORT N SIZE
 *     1. listens on GUESTPORT;
 *     2. opens N connections at once to the host's HOSTPORT (retrying while the host answers RST), sends
 *        SIZE bytes on each, shuts its sending side, reads the echo back to EOF and compares;
 *     3. connects to HOSTPORT+1, where nothing listens, and expects the connection to be refused (RST);
 *     4. accepts N connections on GUESTPORT and echoes each until EOF, all at once;
 *   printing one line per step. Exit status 0 only if every step succeeded. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vsock.h"

#define MAX_CONNS 256
/* The kernel's 2 s connect timeout is about latency; these tests are about the back-end's correctness,
 * and under TCG on a loaded CI machine 64 connects through a userspace back-end can take longer. */
#define CONNECT_TIMEOUT_S 60

static void die(const char *what)
{
    fprintf(stderr, "vsock-test: %s: %s\n", what, strerror(errno));
    exit(1);
}

static unsigned char pattern(unsigned conn, size_t i)
{
    return (unsigned char)(conn * 131u + i * 7u + (i >> 9));
}

static int connect_retrying(uint32_t port, int seconds)
{
    for (int tries = 0; tries < seconds * 20; tries++) {
        int fd = vsock_connect(VSOCK_CID_HOST, port, CONNECT_TIMEOUT_S);
        if (fd >= 0)
            return fd;
        if (errno != ECONNRESET && errno != ECONNREFUSED)
            die("connect");
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    errno = ETIMEDOUT;
    die("connect (the host never listened)");
    return -1;
}

struct conn {
    int fd;
    size_t sent, got;
    unsigned char buf[65536];
    size_t pending, off; /* echo mode: bytes read, not yet written back */
    int done;
};

static struct conn conns[MAX_CONNS];

static void clients(uint32_t port, unsigned n, size_t size)
{
    for (unsigned i = 0; i < n; i++) {
        conns[i] = (struct conn){.fd = i == 0 ? connect_retrying(port, 120)
                                                  : vsock_connect(VSOCK_CID_HOST, port, CONNECT_TIMEOUT_S)};
        if (conns[i].fd < 0)
            die("connect");
    }
    unsigned left = n;
    struct pollfd p[MAX_CONNS];
    while (left) {
        for (unsigned i = 0; i < n; i++) {
            short ev = 0;
            if (!conns[i].done)
                ev = POLLIN | (conns[i].sent < size ? POLLOUT : 0);
            p[i] = (struct pollfd){.fd = conns[i].done ? -1 : conns[i].fd, .events = ev};
        }
        if (poll(p, n, 60000) <= 0)
            die("poll (clients)");
        for (unsigned i = 0; i < n; i++) {
            struct conn *c = &conns[i];
            if (p[i].revents & POLLOUT) {
                unsigned char out[16384];
                size_t k = size - c->sent < sizeof out ? size - c->sent : sizeof out;
                for (size_t j = 0; j < k; j++)
                    out[j] = pattern(i, c->sent + j);
                ssize_t w = write(c->fd, out, k);
                if (w < 0)
                    die("write");
                c->sent += (size_t)w;
                if (c->sent == size && shutdown(c->fd, SHUT_WR) < 0)
                    die("shutdown");
            }
            if (p[i].revents & (POLLIN | POLLHUP)) {
                ssize_t r = read(c->fd, c->buf, sizeof c->buf);
                if (r < 0)
                    die("read");
                if (r == 0) {
                    if (c->got != size) {
                        fprintf(stderr, "vsock-test: connection %u: %zu of %zu bytes came back\n", i, c->got, size);
                        exit(1);
                    }
                    close(c->fd);
                    c->done = 1;
                    left--;
                    continue;
                }
                for (ssize_t j = 0; j < r; j++)
                    if (c->buf[j] != pattern(i, c->got + (size_t)j)) {
                        fprintf(stderr, "vsock-test: connection %u: byte %zu differs\n", i, c->got + (size_t)j);
                        exit(1);
                    }
                c->got += (size_t)r;
            }
        }
    }
    printf("guest->host: %u connections ok\n", n);
}

static void refused(uint32_t port)
{
    int fd = vsock_connect(VSOCK_CID_HOST, port, CONNECT_TIMEOUT_S);
    if (fd >= 0 || (errno != ECONNRESET && errno != ECONNREFUSED)) {
        fprintf(stderr, "vsock-test: connect to host port %u: %s (expected a refusal)\n", port,
                fd >= 0 ? "connected" : strerror(errno));
        exit(1);
    }
    printf("refused: ok\n");
}

static void echo_server(int lfd, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        /* A connection the host lost must end the test with a message, not leave it waiting forever. */
        struct pollfd lp = {.fd = lfd, .events = POLLIN};
        int ready = poll(&lp, 1, CONNECT_TIMEOUT_S * 1000);
        if (ready == 0) {
            fprintf(stderr, "vsock-test: %u of %u host connections came in %d s\n", i, n, CONNECT_TIMEOUT_S);
            exit(1);
        }
        if (ready < 0)
            die("poll (accept)");
        conns[i] = (struct conn){.fd = accept(lfd, NULL, NULL)};
        if (conns[i].fd < 0)
            die("accept");
    }
    unsigned left = n;
    struct pollfd p[MAX_CONNS];
    while (left) {
        for (unsigned i = 0; i < n; i++) {
            struct conn *c = &conns[i];
            p[i] = (struct pollfd){.fd = c->done ? -1 : c->fd, .events = c->pending ? POLLOUT : POLLIN};
        }
        if (poll(p, n, 60000) <= 0)
            die("poll (server)");
        for (unsigned i = 0; i < n; i++) {
            struct conn *c = &conns[i];
            if (c->pending && (p[i].revents & (POLLOUT | POLLHUP | POLLERR))) {
                ssize_t w = write(c->fd, c->buf + c->off, c->pending);
                if (w < 0)
                    die("write (server)");
                c->off += (size_t)w;
                c->pending -= (size_t)w;
            } else if (!c->pending && (p[i].revents & (POLLIN | POLLHUP | POLLERR))) {
                ssize_t r = read(c->fd, c->buf, sizeof c->buf);
                if (r < 0)
                    die("read (server)");
                if (r == 0) {
                    close(c->fd);
                    c->done = 1;
                    left--;
                } else {
                    c->pending = (size_t)r;
                    c->off = 0;
                }
            }
        }
    }
    printf("host->guest: %u connections ok\n", n);
}

int main(int argc, char **argv)
{
    if (argc != 6 || strcmp(argv[1], "echo") != 0) {
        fprintf(stderr, "usage: vsock-test echo HOSTPORT GUESTPORT N SIZE\n");
        return 2;
    }
    uint32_t host_port = (uint32_t)strtoul(argv[2], NULL, 10), guest_port = (uint32_t)strtoul(argv[3], NULL, 10);
    unsigned n = (unsigned)strtoul(argv[4], NULL, 10);
    size_t size = strtoul(argv[5], NULL, 10);
    if (n == 0 || n > MAX_CONNS)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int lfd = vsock_listen(guest_port, (int)n);
    if (lfd < 0)
        die("listen");
    printf("listening on %u\n", guest_port);
    clients(host_port, n, size);
    refused(host_port + 1);
    echo_server(lfd, n);
    return 0;
}
