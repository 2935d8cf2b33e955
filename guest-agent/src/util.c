#include "util.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int vfailf(struct failure *f, const char *stage, int err, const char *fmt, va_list ap)
{
    vsnprintf(f->msg, sizeof f->msg, fmt, ap);
    one_line(f->msg);
    f->stage = stage;
    f->err = err;
    return -1;
}

int failf(struct failure *f, const char *stage, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfailf(f, stage, err, fmt, ap);
    va_end(ap);
    return -1;
}

void one_line(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            *s = '?';
}

uint64_t boottime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

ssize_t read_text_file(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    while (len + 1 < size) {
        ssize_t n = read(fd, buf + len, size - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == ' ' || buf[len - 1] == '\t'))
        len--;
    buf[len] = '\0';
    return (ssize_t)len;
}

int make_dir(const char *path, mode_t mode)
{
    struct stat st;
    if (mkdir(path, mode) == 0)
        return 0;
    if (errno != EEXIST)
        return -1;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return 0;
    errno = ENOTDIR;
    return -1;
}

int path_join(char *out, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, size, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= size) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

int set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static bool sysfs_find_dev(const char *dir, const char *attr, const char *value, char *dev, size_t size)
{
    DIR *d = opendir(dir);
    if (!d)
        return false;
    bool found = false;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        char path[PATH_MAX], text[256];
        if (e->d_name[0] == '.' || path_join(path, sizeof path, "%s/%s/%s", dir, e->d_name, attr) < 0)
            continue;
        if (read_text_file(path, text, sizeof text) >= 0 && strcmp(text, value) == 0)
            found = path_join(dev, size, "/dev/%s", e->d_name) == 0 && access(dev, F_OK) == 0;
    }
    closedir(d);
    return found;
}

bool sysfs_wait_for_dev(const char *dir, const char *attr, const char *value, unsigned timeout_ms, char *dev,
                        size_t size)
{
    /* Drivers register devices, and learn attributes such as a virtio port's name from the host,
     * asynchronously after their module has loaded, and devtmpfs adds the node shortly after the
     * sysfs entry. There is no udev to tell us when all is there: poll briefly. */
    uint64_t deadline = boottime_ns() + (uint64_t)timeout_ms * 1000000u;
    while (!sysfs_find_dev(dir, attr, value, dev, size)) {
        if (boottime_ns() > deadline)
            return false;
        sleep_ms(2);
    }
    return true;
}

noreturn void power_off(void)
{
    sync();
    reboot(RB_POWER_OFF);
    /* Power-off failed (no ACPI?): QEMU runs with -no-reboot, so a reset ends the VM too. */
    reboot(RB_AUTOBOOT);
    for (;;)
        pause();
}
