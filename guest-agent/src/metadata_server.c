#include "metadata_server.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "metadata.h"
#include "metadata_api.h"
#include "metadata_service.h"

#define IDLE_MS 10000u  /* a connection without progress for this long is closed */
#define LINGER_MS 1000u /* after the answer: how long the client's unread bytes are drained */
#define DRAIN_ROUNDS 16
#define MAX_POLLFDS (METADATA_MAX_CONNS + 3) /* + the listener, the timer and PID 1 */

enum conn_state { C_FREE, C_READING, C_WRITING, C_LINGER };

struct conn {
    enum conn_state state;
    int fd;
    size_t len; /* request bytes in its buffer */
    bool eof;
    struct md_reply reply;
    char head[320];
    size_t head_len, sent; /* sent: of the head and the body together */
    uint64_t accepted, deadline;
};

static const struct md_store *store;
static struct conn conns[METADATA_MAX_CONNS];
static uint8_t bufs[METADATA_MAX_CONNS][METADATA_REQUEST_MAX];
static int listen_fd = -1, timer_fd = -1, peer_fd = -1;
static uint64_t timer_set_to; /* the deadline the timer is armed for, 0: disarmed */

static void conn_close(struct conn *c)
{
    close(c->fd);
    *c = (struct conn){.state = C_FREE, .fd = -1};
}

static void progress(struct conn *c)
{
    c->deadline = boottime_ns() + (uint64_t)IDLE_MS * 1000000u;
}

/* Reads and drops what the client still sends after the answer, until it closes (or LINGER_MS). */
static void conn_drain(struct conn *c)
{
    uint8_t sink[4096];
    for (int i = 0; i < DRAIN_ROUNDS; i++) {
        ssize_t n = recv(c->fd, sink, sizeof sink, 0);
        if (n > 0 || (n < 0 && errno == EINTR))
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        break;
    }
    conn_close(c);
}

static void conn_write(struct conn *c)
{
    size_t body_len = c->reply.head ? 0 : c->reply.body_len, total = c->head_len + body_len;
    while (c->sent < total) {
        struct iovec iov[2];
        size_t n = 0, body_off = c->sent > c->head_len ? c->sent - c->head_len : 0;
        if (c->sent < c->head_len)
            iov[n++] = (struct iovec){c->head + c->sent, c->head_len - c->sent};
        if (body_len > body_off)
            iov[n++] = (struct iovec){(void *)(c->reply.body + body_off), body_len - body_off};
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = n};
        ssize_t w = sendmsg(c->fd, &m, MSG_NOSIGNAL);
        if (w > 0) {
            c->sent += (size_t)w;
            progress(c);
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && errno == EAGAIN) {
            return;
        } else {
            conn_close(c); /* the client has gone */
            return;
        }
    }
    /* Half-close, then drain: closing with unread request bytes would make the kernel reset the
     * connection, and a reset can destroy the answer before the client has read it. */
    shutdown(c->fd, SHUT_WR);
    c->state = C_LINGER;
    c->deadline = boottime_ns() + (uint64_t)LINGER_MS * 1000000u;
    conn_drain(c);
}

static void conn_answer(struct conn *c)
{
    c->head_len = metadata_head(&c->reply, c->head, sizeof c->head);
    c->sent = 0;
    c->state = C_WRITING;
    service_debug("%s: %d (%llu us)", c->reply.what, c->reply.status,
                  (unsigned long long)(boottime_ns() - c->accepted) / 1000u);
    conn_write(c);
}

static void conn_read(struct conn *c)
{
    uint8_t *buf = bufs[c - conns];
    while (c->len < METADATA_REQUEST_MAX && !c->eof) {
        ssize_t n = recv(c->fd, buf + c->len, METADATA_REQUEST_MAX - c->len, 0);
        if (n > 0) {
            c->len += (size_t)n;
            progress(c);
        } else if (n == 0) {
            c->eof = true;
        } else if (errno == EAGAIN) {
            break;
        } else if (errno != EINTR) {
            conn_close(c);
            return;
        }
    }
    if (c->len == 0 && c->eof) {
        conn_close(c); /* connected and went away: nothing to answer */
        return;
    }
    if (metadata_respond(store, buf, c->len, c->eof, &c->reply))
        conn_answer(c);
    else if (c->len == METADATA_REQUEST_MAX) { /* cannot happen: the parser caps both parts first */
        metadata_reply_error(&c->reply, 413);
        conn_answer(c);
    }
}

static struct conn *free_conn(void)
{
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        if (conns[i].state == C_FREE)
            return &conns[i];
    return NULL;
}

/* With every slot taken the listener is not polled: new clients wait in the kernel's backlog. */
static void accept_conns(void)
{
    struct conn *c;
    while ((c = free_conn())) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return; /* EAGAIN: nobody else is waiting */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        *c = (struct conn){.state = C_READING, .fd = fd, .accepted = boottime_ns()};
        progress(c);
        conn_read(c); /* the request is often there already */
    }
}

static void expire_conns(void)
{
    uint64_t now = boottime_ns();
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        if (conns[i].state != C_FREE && conns[i].deadline <= now) {
            if (conns[i].state != C_LINGER)
                service_debug("connection closed after %u ms without progress", IDLE_MS);
            conn_close(&conns[i]);
        }
}

/* One timer for every connection's deadline: the loop itself polls without a timeout. */
static void arm_timer(void)
{
    uint64_t next = 0;
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        if (conns[i].state != C_FREE && (!next || conns[i].deadline < next))
            next = conns[i].deadline;
    if (next == timer_set_to)
        return;
    struct itimerspec its = {.it_value = {.tv_sec = (time_t)(next / 1000000000u),
                                          .tv_nsec = (long)(next % 1000000000u)}};
    if (timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
        timer_set_to = next;
}

/* The fixed pollfds first, then one per connection in use, in conns[] order. */
enum { PFD_PEER, PFD_TIMER, PFD_LISTEN, PFD_CONNS };

static size_t fill_pollfds(struct pollfd *pfd, struct conn **owner)
{
    size_t n = PFD_CONNS;
    pfd[PFD_PEER] = (struct pollfd){.fd = peer_fd, .events = POLLIN};
    pfd[PFD_TIMER] = (struct pollfd){.fd = timer_fd, .events = POLLIN};
    pfd[PFD_LISTEN] = (struct pollfd){.fd = free_conn() ? listen_fd : -1, .events = POLLIN};
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        if (conns[i].state != C_FREE) {
            owner[n] = &conns[i];
            pfd[n++] = (struct pollfd){.fd = conns[i].fd, .events = conns[i].state == C_WRITING ? POLLOUT : POLLIN};
        }
    return n;
}

noreturn void metadata_serve(const struct md_store *s, int listen, int timer, int peer)
{
    struct pollfd pfd[MAX_POLLFDS];
    struct conn *owner[MAX_POLLFDS];
    store = s;
    listen_fd = listen;
    timer_fd = timer;
    peer_fd = peer;
    for (size_t i = 0; i < ARRAY_LEN(conns); i++)
        conns[i] = (struct conn){.state = C_FREE, .fd = -1};
    for (;;) {
        arm_timer();
        size_t n = fill_pollfds(pfd, owner);
        if (poll(pfd, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            _exit(MD_EXIT_FAILED);
        }
        if (pfd[PFD_PEER].revents)
            _exit(0); /* PID 1 closed its end: it wants the service gone (PID 1 never sends) */
        if (pfd[PFD_TIMER].revents) {
            uint64_t ticks;
            while (read(timer_fd, &ticks, sizeof ticks) > 0)
                ;
            timer_set_to = 0; /* a one-shot timer that fired is disarmed */
        }
        for (size_t i = PFD_CONNS; i < n; i++) {
            struct conn *c = owner[i];
            if (!pfd[i].revents || c->state == C_FREE || c->fd != pfd[i].fd)
                continue;
            if (c->state == C_READING)
                conn_read(c);
            else if (c->state == C_WRITING)
                conn_write(c);
            else
                conn_drain(c);
        }
        expire_conns();
        if (pfd[PFD_LISTEN].revents) /* last: a slot freed above is not reused within this round */
            accept_conns();
    }
}
