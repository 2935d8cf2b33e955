#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "channel.h"
#include "protocol.h"
#include "tlv.h"

#define EARLY_LINES 64
#define LINE_MAX_LEN 240

static int kmsg_fd = -1;
static bool debug;
static bool ready;
/* Debug lines from before the handshake (mounts, modules, finding the port). */
static char early[EARLY_LINES][LINE_MAX_LEN];
static unsigned early_count, early_dropped;

void log_open_kmsg(void)
{
    if (kmsg_fd < 0)
        kmsg_fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
}

void log_set_debug(bool on)
{
    debug = on;
}

bool log_is_debug(void)
{
    return debug;
}

static void send_log(const char *line)
{
    channel_send_msg(0, &(struct kp_log){.message = (char *)line}); /* only read */
}

void log_debug(const char *fmt, ...)
{
    if (!debug)
        return;
    char line[LINE_MAX_LEN];
    uint64_t ms = boottime_ns() / 1000000u;
    int n = snprintf(line, sizeof line, "[%llu.%03llu] ", (unsigned long long)(ms / 1000),
                     (unsigned long long)(ms % 1000));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    one_line(line);
    if (ready)
        send_log(line);
    else if (early_count < EARLY_LINES)
        memcpy(early[early_count++], line, sizeof line);
    else
        early_dropped++;
}

void log_info(const char *fmt, ...)
{
    char line[LINE_MAX_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    one_line(line);
    if (ready)
        send_log(line);
}

void log_channel_ready(void)
{
    ready = true;
    for (unsigned i = 0; i < early_count; i++)
        send_log(early[i]);
    if (early_dropped)
        log_debug("(%u early debug lines dropped)", early_dropped);
    early_count = early_dropped = 0;
}

noreturn void fatal_failure(const struct failure *f)
{
    char line[sizeof f->msg + 64];
    int n = snprintf(line, sizeof line, "<3>kvmpod-agent: error: %s: %s\n", f->stage, f->msg);
    size_t len = n < 0 ? 0 : (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
    /* Without /dev/kmsg (devtmpfs failed), fd 2 is the console the kernel gave PID 1. */
    if (kmsg_fd < 0 || write(kmsg_fd, line, len) < 0)
        (void)!write(STDERR_FILENO, line + 3, len - 3);
    if (channel_is_open())
        channel_send_error(0, f);
    power_off();
}

noreturn void fatal(const char *stage, int err, const char *fmt, ...)
{
    struct failure f;
    va_list ap;
    va_start(ap, fmt);
    vfailf(&f, stage, err, fmt, ap);
    va_end(ap);
    fatal_failure(&f);
}
