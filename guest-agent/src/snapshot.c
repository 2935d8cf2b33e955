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
#include "snapshot.h"
#include "tlv.h"

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
    struct tlv_reader rd;
    struct tlv_field field;
    struct failure err;
    int more;
    unsigned disks = 0;
    tlv_reader_init(&rd, f->payload, f->len);
    while ((more = tlv_next(&rd, &field, &err)) > 0) {
        if (field.tag != KP_F_DISK_SERIAL)
            continue;
        char *serial = tlv_strdup(&field, &err);
        if (!serial || !image_mount(serial, &err))
            fatal_failure(&err);
        if (app_prebuild(serial, &err) < 0) /* only a saving: the START builds the root instead */
            log_debug("snapshot: no spare root on disk %s: %s", serial, err.msg);
        free(serial);
        disks++;
    }
    if (more < 0)
        fatal_failure(&err);
    metadata_loopback_up(); /* every pod has the metadata service: set up what does not vary */
    log_debug("snapshot: %u image disks mounted, spare app roots built; waiting for THAW", disks);
    channel_send(KP_MSG_PREPARED, 0, NULL, 0);
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
    struct tlv_reader rd;
    struct tlv_field field;
    struct failure err;
    uint64_t words[ENTROPY_WORDS_MAX];
    unsigned nwords = 0;
    uint64_t realtime_ns = 0;
    char *hostname = NULL;
    int more;
    tlv_reader_init(&rd, f->payload, f->len);
    while ((more = tlv_next(&rd, &field, &err)) > 0) {
        if (field.tag == KP_F_ENTROPY && nwords < ENTROPY_WORDS_MAX)
            words[nwords++] = tlv_u64(&field);
        else if (field.tag == KP_F_REALTIME_NS)
            realtime_ns = tlv_u64(&field);
        else if (field.tag == KP_F_HOSTNAME && !hostname && !(hostname = tlv_strdup(&field, &err)))
            fatal_failure(&err);
    }
    if (more < 0)
        fatal_failure(&err);
    /* every clone would share the snapshot's random state: refuse to go on without fresh entropy */
    if (nwords < 4)
        fatal("thaw", EINVAL, "THAW carries %u ENTROPY words, at least 4 are needed", nwords);
    if (!hostname || !realtime_ns)
        fatal("thaw", EINVAL, "THAW lacks %s", hostname ? "REALTIME_NS" : "HOSTNAME");
    reseed(words, nwords);
    explicit_bzero(words, sizeof words);
    struct timespec now = {.tv_sec = (time_t)(realtime_ns / 1000000000u), .tv_nsec = (long)(realtime_ns % 1000000000u)};
    if (clock_settime(CLOCK_REALTIME, &now) < 0)
        fatal("thaw", errno, "setting the clock: %s", strerror(errno));
    if (sethostname(hostname, strlen(hostname)) < 0)
        fatal("thaw", errno, "sethostname %s: %s", hostname, strerror(errno));
    log_debug("thawed: hostname %s, %u entropy words", hostname, nwords);
    free(hostname);
}
