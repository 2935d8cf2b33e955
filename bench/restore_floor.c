/* The restore floor (issue 22; docs/performance.md, "The restore floor"): the least any launcher can do
 * to run /bin/true in a pod restored from kvmpod's boot snapshot. No Python on this path.
 *
 *   restore-floor --qmp-fd N --agent-fd N --restore-fd N --state-fd N --state FILE --restore-commands JSON
 *                 --disk SERIAL --qemu-log FILE [--frames FILE] -- QEMU-ARGV...
 *
 * bench/floor.py prepares everything that is not timed: QEMU's argv exactly as kvmpod spawned it for a
 * restore (so the same binary, options and snapshot files), the fd numbers that argv names, and the
 * restore monitor's commands (kvmpod/vm/spawn.py restore_commands()). This program then does what
 * kvmpod's run path does, minimally:
 *   1. socketpairs for QMP, the agent's virtio-serial port and the restore monitor, QEMU's ends put at
 *      the fd numbers of the argv, the snapshot's device state opened at --state-fd; spawn QEMU (new
 *      session, dies with us, no transparent huge pages: as kvmpod/vm/spawn.py qemu_preexec);
 *   2. the restore commands on the restore monitor, qmp_capabilities on QMP, THAW to the agent;
 *   3. HELLO -> HELLO_ACK, START /bin/true on stream 1, wait for its EXIT;
 *   4. QMP quit (kvmpod's teardown of a pod without host volumes), wait for QEMU to exit.
 * The frames come from the agent's own generated protocol tables and encoder (guest-agent/build/
 * messages.c, src/tlv.c): one definition, kvmpod/agent/protocol.toml, for every end.
 * With --frames, step 3 sends that file's frames (what kvmpod itself sent between HELLO_ACK and its
 * START, recorded by bench/floor.py: the metadata documents, METADATA_START, the app's full START) in
 * place of the minimal START, and waits for the EXIT on that START's stream: the same guest work as
 * kvmpod's, without kvmpod.
 *
 * Prints one line: "hello S exit S end S qemu_cpu S" (seconds from spawn to the agent's HELLO, to the
 * app's EXIT, to QEMU's exit; and the CPU time QEMU used, user + system: a figure host load hardly moves). Exit status 0 only if the app exited 0 and QEMU ended; anything else is a message on
 * stderr and status 1. */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "messages.h"
#include "protocol.h"
#include "tlv.h"

#define TIMEOUT_MS 30000
#define ENTROPY_WORDS 8 /* as kvmpod/agent/session.py THAW_ENTROPY_WORDS */

static pid_t qemu_pid = -1;

static noreturn void die(const char *fmt, ...) PRINTF(1, 2);
static noreturn void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("restore-floor: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    if (qemu_pid > 0) {
        kill(qemu_pid, SIGKILL);
        waitpid(qemu_pid, NULL, 0);
    }
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void write_all(int fd, const void *buf, size_t len, const char *what)
{
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("writing to %s: %s", what, strerror(errno));
        p += n;
        len -= (size_t)n;
    }
}

static uint8_t out[KP_HEADER_SIZE + KP_MAX_PAYLOAD];

static void send_frame(int fd, uint16_t type, uint32_t stream, const struct kp_msg_desc *d, const void *msg)
{
    size_t len = d ? kp_encode(d, msg, out + KP_HEADER_SIZE, KP_MAX_PAYLOAD) : 0;
    le_put(out, len, 4);
    le_put(out + 4, type, 2);
    le_put(out + 6, 0, 2);
    le_put(out + 8, stream, 4);
    write_all(fd, out, KP_HEADER_SIZE + len, "the agent");
}

/* The agent channel's reader: the next frame's type, stream and payload (valid until the next call). */
static uint8_t in[2 * (KP_HEADER_SIZE + KP_MAX_PAYLOAD)];
static size_t in_start, in_end;

static const uint8_t *next_frame(int fd, uint16_t *type, uint32_t *stream, uint32_t *len, double deadline)
{
    for (;;) {
        size_t have = in_end - in_start;
        if (have >= KP_HEADER_SIZE) {
            const uint8_t *h = in + in_start;
            *len = le_get(h, 4);
            *type = (uint16_t)le_get(h + 4, 2);
            *stream = le_get(h + 8, 4);
            if (*len > KP_MAX_PAYLOAD)
                die("the agent sent a frame of %u bytes", *len);
            if (have >= KP_HEADER_SIZE + *len) {
                in_start += KP_HEADER_SIZE + *len;
                return h + KP_HEADER_SIZE;
            }
        }
        if (in_start > 0) {
            memmove(in, in + in_start, have);
            in_start = 0;
            in_end = have;
        }
        int left = (int)((deadline - now()) * 1000);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = left > 0 ? poll(&p, 1, left) : 0;
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            die("no frame from the agent in %d ms", TIMEOUT_MS);
        ssize_t n = read(fd, in + in_end, sizeof(in) - in_end);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("the agent channel closed (QEMU ended?)");
        in_end += (size_t)n;
    }
}

static int parse_fd(const char *s)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 3 || v > 1000)
        die("bad fd number %s", s);
    return (int)v;
}

int main(int argc, char **argv)
{
    int qmp_fd = -1, agent_fd = -1, restore_fd = -1, state_fd = -1;
    const char *state = NULL, *commands = NULL, *disk = NULL, *qemu_log = "/dev/null", *frames = NULL;
    int i = 1;
    for (; i + 1 < argc && strcmp(argv[i], "--") != 0; i += 2) {
        const char *opt = argv[i], *val = argv[i + 1];
        if (!strcmp(opt, "--qmp-fd")) qmp_fd = parse_fd(val);
        else if (!strcmp(opt, "--agent-fd")) agent_fd = parse_fd(val);
        else if (!strcmp(opt, "--restore-fd")) restore_fd = parse_fd(val);
        else if (!strcmp(opt, "--state-fd")) state_fd = parse_fd(val);
        else if (!strcmp(opt, "--state")) state = val;
        else if (!strcmp(opt, "--restore-commands")) commands = val;
        else if (!strcmp(opt, "--disk")) disk = val;
        else if (!strcmp(opt, "--qemu-log")) qemu_log = val;
        else if (!strcmp(opt, "--frames")) frames = val;
        else die("unknown option %s", opt);
    }
    if (i >= argc || strcmp(argv[i], "--") != 0 || i + 1 >= argc || qmp_fd < 0 || agent_fd < 0 ||
        restore_fd < 0 || state_fd < 0 || !state || !commands || !disk)
        die("usage: see bench/restore_floor.c");
    char **qemu_argv = argv + i + 1;
    int targets[4] = {qmp_fd, agent_fd, restore_fd, state_fd};
    for (int a = 0; a < 4; a++)
        for (int b = a + 1; b < 4; b++)
            if (targets[a] == targets[b])
                die("two channels at fd %d", targets[a]);

    /* --frames: read (untimed), and the stream of the START among them */
    static uint8_t recorded[4 << 20];
    size_t recorded_len = 0;
    uint32_t app_stream = 1;
    if (frames) {
        int fd = open(frames, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die("%s: %s", frames, strerror(errno));
        ssize_t n;
        while ((n = read(fd, recorded + recorded_len, sizeof(recorded) - recorded_len)) > 0)
            recorded_len += (size_t)n;
        close(fd);
        app_stream = 0;
        for (size_t off = 0; off + KP_HEADER_SIZE <= recorded_len;
             off += KP_HEADER_SIZE + le_get(recorded + off, 4))
            if (le_get(recorded + off + 4, 2) == KP_MSG_START)
                app_stream = le_get(recorded + off + 8, 4);
        if (app_stream == 0)
            die("%s: no START frame", frames);
    }

    double spawn = now();
    int qmp[2], agent[2], restore[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, qmp) || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, agent) ||
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, restore))
        die("socketpair: %s", strerror(errno));
    int state_file = open(state, O_RDONLY | O_CLOEXEC);
    if (state_file < 0)
        die("%s: %s", state, strerror(errno));
    int log_fd = open(qemu_log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log_fd < 0)
        die("%s: %s", qemu_log, strerror(errno));

    qemu_pid = fork();
    if (qemu_pid < 0)
        die("fork: %s", strerror(errno));
    if (qemu_pid == 0) {
        /* QEMU's ends go where the argv says; first out of the way of every target number */
        int theirs[4] = {qmp[1], agent[1], restore[1], state_file};
        for (int k = 0; k < 4; k++)
            if ((theirs[k] = fcntl(theirs[k], F_DUPFD_CLOEXEC, 1001)) < 0)
                _exit(126);
        for (int k = 0; k < 4; k++)
            if (dup2(theirs[k], targets[k]) < 0)   /* dup2 clears FD_CLOEXEC on the copy */
                _exit(126);
        int null = open("/dev/null", O_RDWR);
        if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(log_fd, 2) < 0)
            _exit(126);
        setsid();
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
        execv(qemu_argv[0], qemu_argv);
        _exit(127);
    }
    close(qmp[1]);
    close(agent[1]);
    close(restore[1]);
    close(state_file);
    close(log_fd);

    write_all(restore[0], commands, strlen(commands), "the restore monitor");
    static const char caps[] = "{\"execute\": \"qmp_capabilities\"}\n";
    write_all(qmp[0], caps, sizeof(caps) - 1, "QMP");

    uint64_t words[ENTROPY_WORDS];
    if (getrandom(words, sizeof(words), 0) != (ssize_t)sizeof(words))
        die("getrandom: %s", strerror(errno));
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    struct kp_thaw thaw = {.hostname = "restore-floor", .entropy = {.v = words, .n = ENTROPY_WORDS},
                           .realtime_ns = (uint64_t)rt.tv_sec * 1000000000u + (uint64_t)rt.tv_nsec};
    send_frame(agent[0], KP_MSG_THAW, 0, &kp_thaw_desc, &thaw);

    double deadline = spawn + TIMEOUT_MS / 1000.0, hello_at = 0, exit_at = 0;
    uint16_t type;
    uint32_t stream, len;
    struct failure f;
    for (;;) {
        const uint8_t *payload = next_frame(agent[0], &type, &stream, &len, deadline);
        if (type == KP_MSG_LOG)
            continue;
        if (type != KP_MSG_HELLO)
            die("the agent sent message %u before HELLO", type);
        struct kp_hello hello;
        if (kp_hello_decode(&hello, payload, len, &f) < 0)
            die("HELLO: %s", f.msg);
        uint32_t version = hello.proto_max < KP_VERSION ? hello.proto_max : KP_VERSION;
        kp_hello_free(&hello);
        hello_at = now();
        struct kp_hello_ack ack = {.proto_version = version};
        send_frame(agent[0], KP_MSG_HELLO_ACK, 0, &kp_hello_ack_desc, &ack);
        break;
    }
    if (frames) {
        write_all(agent[0], recorded, recorded_len, "the agent");
    } else {
        char *args[] = {"/bin/true", NULL};
        struct kp_start start = {.app_name = "floor", .disk_serial = (char *)disk, .arg = {.v = args, .n = 1}};
        send_frame(agent[0], KP_MSG_START, app_stream, &kp_start_desc, &start);
    }
    for (;;) {
        const uint8_t *payload = next_frame(agent[0], &type, &stream, &len, deadline);
        if (type == KP_MSG_ERROR) {
            struct kp_error err;
            if (kp_error_decode(&err, payload, len, &f) < 0)
                die("ERROR: %s", f.msg);
            die("the agent failed (%s): %s", err.stage, err.message);
        }
        if (type != KP_MSG_EXIT || stream != app_stream)
            continue; /* STARTED, output, WINDOW, LOG */
        struct kp_exit ex;
        if (kp_exit_decode(&ex, payload, len, &f) < 0)
            die("EXIT: %s", f.msg);
        if (!ex.has_exit_code || ex.exit_code != 0)
            die("/bin/true ended with %s %d", ex.has_exit_code ? "exit code" : "signal",
                ex.has_exit_code ? ex.exit_code : (int)ex.term_signal);
        exit_at = now();
        break;
    }
    static const char quit[] = "{\"execute\": \"quit\"}\n";
    write_all(qmp[0], quit, sizeof(quit) - 1, "QMP");
    int status;
    struct rusage ru;
    while (wait4(qemu_pid, &status, 0, &ru) < 0)
        if (errno != EINTR)
            die("waitpid: %s", strerror(errno));
    qemu_pid = -1;
    double end = now();
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die("QEMU ended with status %#x", status);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 (double)ru.ru_stime.tv_usec / 1e6;
    printf("hello %.6f exit %.6f end %.6f qemu_cpu %.6f\n", hello_at - spawn, exit_at - spawn, end - spawn, cpu);
    return 0;
}
