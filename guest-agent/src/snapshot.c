/* Boot snapshots: see snapshot.h and docs/snapshot.md. */

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "app.h"
#include "log.h"
#include "metadata.h"
#include "protocol.h"
#include "messages.h"
#include "snapshot.h"

#define ENTROPY_WORDS_MAX 64

/* musl ships no kernel headers: these are include/uapi/linux/random.h's. */
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#define RNDRESEEDCRNG _IO('R', 0x07)
struct rand_pool_info {
    int entropy_count;
    int buf_size;
    uint32_t buf[];
};

void snapshot_prepare(const struct frame *f)
{
    struct kp_prepare m;
    struct failure err;
    if (kp_prepare_decode(&m, f->payload, f->len, &err) < 0)
        fatal_failure(&err);
    for (size_t i = 0; i < m.disk_serial.n; i++) {
        const char *serial = m.disk_serial.v[i];
        if (!image_mount(serial, &err))
            fatal_failure(&err);
        if (app_prebuild(serial, &err) < 0) /* only a saving: the START builds the root instead */
            log_debug("snapshot: no spare root on disk %s: %s", serial, err.msg);
    }
    metadata_loopback_up(); /* every pod has the metadata service: set up what does not vary */
    log_debug("snapshot: %zu image disks mounted, spare app roots built; waiting for THAW", m.disk_serial.n);
    kp_prepare_free(&m);
    channel_send_msg(0, &(struct kp_prepared){0});
}

/* Mixes the host's words into the input pool, then has the generator reseed from it at once:
 * without RNDRESEEDCRNG the clones would go on with the snapshot's key until the next timed reseed. */
static void reseed(const uint64_t *words, unsigned n)
{
    struct {
        struct rand_pool_info info;
        uint64_t words[ENTROPY_WORDS_MAX];
    } pool;
    pool.info.entropy_count = (int)(n * 64);
    pool.info.buf_size = (int)(n * sizeof(uint64_t));
    memcpy(pool.words, words, n * sizeof(uint64_t));
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        fatal("thaw", errno, "/dev/urandom: %s", strerror(errno));
    if (ioctl(fd, RNDADDENTROPY, &pool) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0)
        fatal("thaw", errno, "reseeding the kernel's random generator: %s", strerror(errno));
    close(fd);
    explicit_bzero(&pool, sizeof pool);
}

void snapshot_thaw(const struct frame *f)
{
    struct kp_thaw m;
    struct failure err;
    if (kp_thaw_decode(&m, f->payload, f->len, &err) < 0) /* HOSTNAME and REALTIME_NS are required */
        fatal_failure(&err);
    uint64_t realtime_ns = m.realtime_ns;
    char *hostname = m.hostname;
    /* every clone would share the snapshot's random state: refuse to go on without fresh entropy */
    unsigned nwords = m.entropy.n < ENTROPY_WORDS_MAX ? (unsigned)m.entropy.n : ENTROPY_WORDS_MAX;
    if (nwords < 4)
        fatal("thaw", EINVAL, "THAW carries %u ENTROPY words, at least 4 are needed", nwords);
    if (!realtime_ns)
        fatal("thaw", EINVAL, "THAW's REALTIME_NS is 0");
    reseed(m.entropy.v, nwords);
    explicit_bzero(m.entropy.v, m.entropy.n * sizeof *m.entropy.v);
    struct timespec now = {.tv_sec = (time_t)(realtime_ns / 1000000000u), .tv_nsec = (long)(realtime_ns % 1000000000u)};
    if (clock_settime(CLOCK_REALTIME, &now) < 0)
        fatal("thaw", errno, "setting the clock: %s", strerror(errno));
    if (sethostname(hostname, strlen(hostname)) < 0)
        fatal("thaw", errno, "sethostname %s: %s", hostname, strerror(errno));
    log_debug("thawed: hostname %s, %u entropy words", hostname, nwords);
    kp_thaw_free(&m);
}
