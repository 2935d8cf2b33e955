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

struct msg_spec {
    uint16_t id;
    const char *name;
    enum kp_from from;
    enum kp_stream_kind stream;
    enum kp_payload_kind payload;
};

static const struct msg_spec SPECS[] = {
#define SPEC(name, from, stream, payload) {KP_MSG_##name, #name, from, stream, payload},
    KP_MESSAGES(SPEC)
#undef SPEC
};

static int fd = -1;
static bool connected; /* a vsock channel is connected once accepted; a serial port once the host opens it */
static uint8_t rbuf[FRAME_MAX];
static size_t rstart, rend; /* unconsumed bytes are rbuf[rstart..rend) */
static uint8_t wbuf[FRAME_MAX];

static const struct msg_spec *spec_of(uint16_t type)
{
    for (size_t i = 0; i < ARRAY_LEN(SPECS); i++)
        if (SPECS[i].id == type)
            return &SPECS[i];
    return NULL;
}

const char *message_name(uint16_t type)
{
    const struct msg_spec *s = spec_of(type);
    return s ? s->name : "?";
}

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

void channel_send(uint16_t type, uint32_t stream, const void *payload, size_t len)
{
    if (len > KP_MAX_PAYLOAD)
        abort(); /* a bug in the agent; PID 1 dying makes the host report it */
    le_put(wbuf, (uint32_t)len, 4);
    le_put(wbuf + 4, type, 2);
    le_put(wbuf + 6, 0, 2);
    le_put(wbuf + 8, stream, 4);
    if (len && payload != wbuf + KP_HEADER_SIZE) /* channel_send_message encodes in place */
        memcpy(wbuf + KP_HEADER_SIZE, payload, len);
    /* The port is non-blocking (the event loop polls it); a frame is still written whole and in
     * order, so wait for room rather than dropping or interleaving bytes. */
    const uint8_t *p = wbuf;
    size_t left = KP_HEADER_SIZE + len;
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

void channel_send_message(const struct kp_msg_desc *d, uint32_t stream, const void *msg)
{
    uint8_t *payload = wbuf + KP_HEADER_SIZE;
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
    if (rstart) {
        memmove(rbuf, rbuf + rstart, rend - rstart);
        rend -= rstart;
        rstart = 0;
    }
    /* The buffer holds one maximal frame, so a frame always fits once earlier ones are taken. */
    while (rend < sizeof rbuf) {
        ssize_t n = read(fd, rbuf + rend, sizeof rbuf - rend);
        if (n > 0)
            rend += (size_t)n;
        else if (n < 0 && errno == EINTR)
            continue;
        else if (n < 0 && errno == EAGAIN)
            return true;
        else
            return false; /* EOF: virtio_console reads 0 once the host end has closed */
    }
    return true;
}

static void check_header(uint32_t len, uint16_t type, uint16_t flags, uint32_t stream)
{
    if (len > KP_MAX_PAYLOAD)
        fatal("protocol", 0, "frame payload of %u bytes exceeds the %u-byte limit", len, KP_MAX_PAYLOAD);
    const struct msg_spec *s = spec_of(type);
    if (!s)
        fatal("protocol", 0, "unknown message type %u", type);
    if (flags)
        fatal("protocol", 0, "%s frame has reserved flags 0x%x set", s->name, flags);
    if (s->from != KP_FROM_HOST)
        fatal("protocol", 0, "host sent %s, a guest-to-host message", s->name);
    if ((s->stream == KP_STREAM_ZERO && stream != 0) || (s->stream == KP_STREAM_PROCESS && stream == 0))
        fatal("protocol", 0, "%s frame on stream %u, which it may not use", s->name, stream);
    if (s->payload == KP_PAYLOAD_EMPTY && len)
        fatal("protocol", 0, "%s frame carries a payload", s->name);
}

bool channel_next(struct frame *f)
{
    size_t avail = rend - rstart;
    if (avail < KP_HEADER_SIZE)
        return false;
    const uint8_t *h = rbuf + rstart;
    uint32_t len = le_get(h, 4);
    f->type = (uint16_t)le_get(h + 4, 2);
    f->stream = le_get(h + 8, 4);
    /* Checked before the payload arrives: an oversized length is refused, never waited for. */
    check_header(len, f->type, (uint16_t)le_get(h + 6, 2), f->stream);
    if (avail - KP_HEADER_SIZE < len)
        return false;
    f->payload = h + KP_HEADER_SIZE;
    f->len = len;
    rstart += KP_HEADER_SIZE + len;
    return true;
}
