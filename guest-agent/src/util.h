/* Small helpers shared by the agent's modules. */
#ifndef KVMPOD_UTIL_H
#define KVMPOD_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdnoreturn.h>
#include <sys/types.h>

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))

/* A failure to report to the host: the protocol's STAGE, an errno (0 if none) and one line of text. */
struct failure {
    const char *stage;
    int err;
    char msg[256];
};

/* Fills *f and returns -1, so callers can `return failf(...)`. */
int failf(struct failure *f, const char *stage, int err, const char *fmt, ...) PRINTF(4, 5);
int vfailf(struct failure *f, const char *stage, int err, const char *fmt, va_list ap) PRINTF(4, 0);

/* Replaces control characters (newlines included) so a message stays one line. */
void one_line(char *s);

/* Little-endian integers of `width` bytes, as everything on the wire is. */
static inline uint32_t le_get(const uint8_t *p, unsigned width)
{
    uint32_t v = 0;
    for (unsigned i = width; i-- > 0;)
        v = v << 8 | p[i];
    return v;
}

static inline void le_put(uint8_t *p, uint64_t v, unsigned width)
{
    for (unsigned i = 0; i < width; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

uint64_t boottime_ns(void);
void sleep_ms(unsigned ms);

/* Reads a small file into buf as a NUL-terminated string without trailing whitespace.
 * Returns its length, or -1 with errno set. */
ssize_t read_text_file(const char *path, char *buf, size_t size);

/* mkdir that accepts an existing directory. Returns 0 or -1 with errno set. */
int make_dir(const char *path, mode_t mode);

/* snprintf into a path buffer; returns -1 (ENAMETOOLONG) instead of truncating. */
int path_join(char *out, size_t size, const char *fmt, ...) PRINTF(3, 4);

int set_nonblocking(int fd);

/* Waits up to timeout_ms for an entry of the sysfs directory `dir` whose file `attr` holds
 * `value` (trailing whitespace ignored) and writes "/dev/<entry>" to dev. Returns false on timeout. */
bool sysfs_wait_for_dev(const char *dir, const char *attr, const char *value, unsigned timeout_ms, char *dev,
                        size_t size);

/* Ends the VM. PID 1 must never exit: that would panic the kernel. */
noreturn void power_off(void);

#endif
