#include "channel.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "protocol.h"
#include "tlv.h"
#include "util.h"
#include "vsock.h"

#define PORTS_DIR "/sys/class/virtio-ports"
#define PORT_TIMEOUT_MS 15000u
#define FRAME_MAX (KP_HEADER_SIZE + KP_MAX_PAYLOAD)

static int fd = -1;
static bool connected; /* a vsock channel is connected once accepted; a serial port once the host opens it */
static uint8_t rbuf[FRAME_MAX];
static struct frame_reader reader = FRAME_READER(rbuf);
static uint8_t wbuf[FRAME_MAX];

void channel_open(const char *name)
{
    /* There is no udev in the guest: the port's name is only in sysfs, its node is /dev/vportNpM.
     * virtio_console learns about ports and their names from the host through its control queue
     * after the module has loaded, so the port turns up a little later. */
    char dev[PATH_MAX];
    if (!sysfs_wait_for_dev(PORTS_DIR, "name", name, PORT_TIMEOUT_MS, dev, sizeof dev))
        fatal("channel", ETIMEDOUT, "no virtio-serial port named %s after %u s", name, PORT_TIMEOUT_MS / 1000);
    fd = open(dev, O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        fatal("channel", errno, "open %s: %s", dev, strerror(errno));
    log_debug("channel %s is %s", name, dev);
}

void channel_open_vsock(uint32_t port)
{
    /* The host connects to us (docs/vsock.md): listen, take the one connection, stop listening, so
     * nothing else on the host reaches the agent's port once the pod runs. Until we listen, the
     * host's connection requests are answered with RST and it tries again. */
    int lfd = vsock_listen(port, 1);
    if (lfd < 0)
        fatal("channel", errno, "listen on vsock port %u: %s", port, strerror(errno));
    log_debug("channel: listening on vsock port %u", port);
    do
        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        fatal("channel", errno, "accept on vsock port %u: %s", port, strerror(errno));
    close(lfd);
    connected = true;
}

bool channel_is_open(void)
{
    return fd >= 0;
}

int channel_fd(void)
{
    return fd;
}

void channel_wait_for_host(void)
{
    /* virtio_console reports POLLHUP (and refuses writes) while no host end is connected, so
     * poll() returns at once until the host connects: look again every few ms. */
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (connected)
        return;
    while (poll(&p, 1, -1) < 0 || !(p.revents & POLLOUT)) {
        if (p.revents & (POLLERR | POLLNVAL))
            power_off();
        sleep_ms(5);
    }
}

/* After the handshake POLLHUP means the host end has closed: nobody is left to serve. */
static void wait_writable(void)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    for (;;) {
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            power_off();
        }
        if (p.revents & POLLOUT)
            return;
        if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
            power_off();
    }
}

/* The port is non-blocking (the event loop polls it); a frame is still written whole and in order,
 * so wait for room rather than dropping or interleaving bytes. */
static void write_all(const uint8_t *p, size_t left)
{
    while (left) {
        ssize_t n = write(fd, p, left);
        if (n > 0) {
            p += n;
            left -= (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            wait_writable();
        } else {
            power_off(); /* the host has gone */
        }
    }
}

static void put_header(uint16_t type, uint32_t stream, size_t len)
{
    le_put(wbuf, (uint32_t)len, 4);
    le_put(wbuf + 4, type, 2);
    le_put(wbuf + 6, 0, 2);
    le_put(wbuf + 8, stream, 4);
}

void channel_send(uint16_t type, uint32_t stream, const void *payload, size_t len)
{
    if (len > KP_MAX_PAYLOAD)
        abort(); /* a bug in the agent; PID 1 dying makes the host report it */
    put_header(type, stream, len);
    if (len && payload != wbuf + KP_HEADER_SIZE) /* channel_payload_space()'s is in place */
        memcpy(wbuf + KP_HEADER_SIZE, payload, len);
    write_all(wbuf, KP_HEADER_SIZE + len);
}

/* The staging pipe: output is spliced into it first, so that a frame's payload is all it holds. A
 * splice() to a virtio-serial port must empty its source pipe: Linux's port_fops_splice_write (6.1)
 * sizes its scatterlist by the pipe's buffers and does not end it after fewer, so taking part of a
 * pipe a writer keeps filling queued zero-length descriptors, and QEMU stopped the device ("virtio:
 * zero sized buffers are not allowed"; the pod hung). Nothing but the agent writes this one. */
static int stage[2] = {-1, -1};
static size_t staged;

ssize_t channel_stage(int pipe_fd, size_t max)
{
    if (stage[0] < 0 && pipe2(stage, O_CLOEXEC | O_NONBLOCK) < 0) {
        log_debug("no staging pipe (%s): output is read and written", strerror(errno));
        errno = EINVAL; /* as when splice() is refused: the caller reads the pipe instead */
        return -1;
    }
    ssize_t n;
    do
        n = splice(pipe_fd, NULL, stage[1], NULL, max, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    while (n < 0 && errno == EINTR);
    if (n > 0)
        staged += (size_t)n;
    return n;
}

void channel_send_staged(uint16_t type, uint32_t stream)
{
    static bool copy; /* splice() to the channel refused once (a driver without it): copy from then on */
    if (staged > KP_MAX_PAYLOAD)
        abort();
    put_header(type, stream, staged);
    write_all(wbuf, KP_HEADER_SIZE);
    while (staged) {
        ssize_t n = copy ? -1 : splice(stage[0], NULL, fd, NULL, staged, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0 && errno == EAGAIN) { /* the port is full (the staging pipe holds `staged` bytes) */
            wait_writable();
            continue;
        }
        if (n < 0 && errno == EINVAL)
            copy = true;
        if (n <= 0 && !(n < 0 && errno == EINTR)) {
            n = read(stage[0], wbuf + KP_HEADER_SIZE, staged);
            if (n <= 0 && !(n < 0 && errno == EINTR))
                fatal("channel", n < 0 ? errno : 0, "stream %u: %zu bytes of output staged are gone", stream, staged);
            if (n > 0)
                write_all(wbuf + KP_HEADER_SIZE, (size_t)n);
        }
        if (n > 0)
            staged -= (size_t)n;
    }
}

uint8_t *channel_payload_space(void)
{
    return wbuf + KP_HEADER_SIZE;
}

void channel_send_message(const struct kp_msg_desc *d, uint32_t stream, const void *msg)
{
    uint8_t *payload = channel_payload_space();
    channel_send(d->type, stream, payload, kp_encode(d, msg, payload, KP_MAX_PAYLOAD));
}

void channel_send_error(uint32_t stream, const struct failure *f)
{
    /* The message's strings are only read: the casts drop a const the struct cannot carry. */
    struct kp_error e = {.stage = (char *)f->stage, .has_errno_ = f->err != 0, .errno_ = (uint32_t)f->err,
                         .message = (char *)f->msg};
    channel_send_msg(stream, &e);
}

bool channel_fill(void)
{
    size_t room;
    uint8_t *p = frame_reader_space(&reader, &room);
    /* The buffer holds one maximal frame, so a frame always fits once earlier ones are taken. */
    while (room) {
        ssize_t n = read(fd, p, room);
        if (n > 0) {
            frame_reader_filled(&reader, (size_t)n);
            p += n;
            room -= (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            return true;
        } else {
            return false; /* EOF: virtio_console reads 0 once the host end has closed */
        }
    }
    return true;
}

bool channel_next(struct frame *fr)
{
    struct failure f;
    int rc = frame_reader_next(&reader, fr, &f);
    if (rc < 0)
        fatal_failure(&f);
    return rc > 0;
}
