#include "seccomp.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

#include "tables.h"

/* Classic BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h). */
#define OP_LD_W_ABS 0x20u /* BPF_LD | BPF_W | BPF_ABS */
#define OP_JEQ_K 0x15u    /* BPF_JMP | BPF_JEQ | BPF_K */
#define OP_JGE_K 0x35u    /* BPF_JMP | BPF_JGE | BPF_K */
#define OP_RET_K 0x06u    /* BPF_RET | BPF_K */
#define RET_KILL_PROCESS 0x80000000u
#define RET_ERRNO 0x00050000u
#define RET_ALLOW 0x7fff0000u
#define RET_DATA 0x0000ffffu
#define MODE_FILTER 2
/* struct seccomp_data: int nr; __u32 arch; ... */
#define DATA_NR 0u
#define DATA_ARCH 4u
#define MAX_INSNS 4096u /* BPF_MAXINSNS */

static const char *const RETAIN = "os/linux/seccomp-retain-set";
static const char *const REMOVE = "os/linux/seccomp-remove-set";
/* What an app needs to start and end whatever its retain set says (spec/ace.md allows this). */
static char *const LIFE_CYCLE[] = {"execve", "exit", "exit_group", NULL};

static bool lookup(const struct kp_named *table, size_t n, const char *name, unsigned *value)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(table[i].name, name) == 0) {
            *value = table[i].value;
            return true;
        }
    return false;
}

/* The syscall numbers of a set, without duplicates, in nrs[] (room for every known syscall). */
static int set_numbers(char *const *names, const char *isolator, bool skip_unknown, unsigned *nrs, size_t *n,
                       struct failure *f)
{
    for (; *names; names++) {
        unsigned nr;
        if ((*names)[0] == '@')
            return failf(f, "seccomp", EINVAL, "%s: %s is not supported (kvmpod knows @appc.io/all in %s and "
                         "@appc.io/empty in %s)", isolator, *names, RETAIN, REMOVE);
        if (!lookup(KP_SYSCALLS, ARRAY_LEN(KP_SYSCALLS), *names, &nr) && skip_unknown)
            continue; /* an OCI profile names every architecture's syscalls: this one lacks it */
        if (!lookup(KP_SYSCALLS, ARRAY_LEN(KP_SYSCALLS), *names, &nr))
            return failf(f, "seccomp", EINVAL, "%s: unknown %s syscall %s", isolator, KP_ARCH_NAME, *names);
        size_t i = 0;
        while (i < *n && nrs[i] != nr)
            i++;
        if (i == *n)
            nrs[(*n)++] = nr;
    }
    return 0;
}

static bool has(char *const *names, const char *wanted)
{
    for (; *names; names++)
        if (strcmp(*names, wanted) == 0)
            return true;
    return false;
}

static struct bpf_insn stmt(uint16_t code, uint32_t k)
{
    return (struct bpf_insn){.code = code, .k = k};
}

static struct bpf_insn jump(uint16_t code, uint32_t k, uint8_t jt, uint8_t jf)
{
    return (struct bpf_insn){.code = code, .jt = jt, .jf = jf, .k = k};
}

/* arch check; (x86_64) the x32 ABI refused; then "nr == n: return `match`" per number; else `other`. */
static int emit(const unsigned *nrs, size_t n, uint32_t match, uint32_t other, uint32_t block,
                struct seccomp_filter *out, struct failure *f)
{
    size_t cap = 6 + 2 * n + 1, len = 0;
    if (cap > MAX_INSNS)
        return failf(f, "seccomp", E2BIG, "the seccomp filter would be too long");
    struct bpf_insn *p = calloc(cap, sizeof *p);
    if (!p)
        return failf(f, "seccomp", ENOMEM, "out of memory");
    p[len++] = stmt(OP_LD_W_ABS, DATA_ARCH);
    p[len++] = jump(OP_JEQ_K, KP_AUDIT_ARCH, 1, 0);
    p[len++] = stmt(OP_RET_K, block); /* another ABI (i386 via int 0x80...): its numbers differ */
    p[len++] = stmt(OP_LD_W_ABS, DATA_NR);
    if (KP_X32_SYSCALL_BIT) {
        p[len++] = jump(OP_JGE_K, KP_X32_SYSCALL_BIT, 0, 1);
        p[len++] = stmt(OP_RET_K, block);
    }
    for (size_t i = 0; i < n; i++) {
        p[len++] = jump(OP_JEQ_K, nrs[i], 0, 1);
        p[len++] = stmt(OP_RET_K, match);
    }
    p[len++] = stmt(OP_RET_K, other);
    out->insns = p;
    out->len = len;
    return 0;
}

static int block_action(const char *errno_name, uint32_t *action, struct failure *f)
{
    unsigned value;
    if (!errno_name || !*errno_name) {
        *action = RET_KILL_PROCESS; /* the spec's default: termination by SIGSYS */
        return 0;
    }
    if (!lookup(KP_ERRNOS, ARRAY_LEN(KP_ERRNOS), errno_name, &value) || value > RET_DATA)
        return failf(f, "seccomp", EINVAL, "unknown errno %s for blocked syscalls", errno_name);
    *action = RET_ERRNO | value;
    return 0;
}

int seccomp_build(char *const *retain, char *const *remove, const char *errno_name, bool skip_unknown,
                  struct seccomp_filter *out, struct failure *f)
{
    static unsigned nrs[ARRAY_LEN(KP_SYSCALLS) + ARRAY_LEN(LIFE_CYCLE)];
    size_t n = 0;
    uint32_t block = RET_KILL_PROCESS;
    *out = (struct seccomp_filter){0};
    if (retain && remove)
        return failf(f, "seccomp", EINVAL, "%s and %s cannot be used together", RETAIN, REMOVE);
    if (!retain && !remove)
        return 0;
    if (block_action(errno_name, &block, f) < 0)
        return -1;
    /* The wildcards mask the rest of their set (spec/ace.md): all retained or none removed is no
     * filter at all (kvmpod's own default lists are the life-cycle calls and nothing). */
    if ((retain && has(retain, "@appc.io/all")) || (remove && has(remove, "@appc.io/empty")))
        return 0;
    if (retain) {
        if (set_numbers(retain, RETAIN, skip_unknown, nrs, &n, f) < 0 ||
            set_numbers(LIFE_CYCLE, RETAIN, false, nrs, &n, f) < 0)
            return -1;
        return emit(nrs, n, RET_ALLOW, block, block, out, f);
    }
    if (set_numbers(remove, REMOVE, skip_unknown, nrs, &n, f) < 0)
        return -1;
    return emit(nrs, n, block, RET_ALLOW, block, out, f);
}

int seccomp_allow_only(char *const *names, struct seccomp_filter *out, struct failure *f)
{
    static unsigned nrs[ARRAY_LEN(KP_SYSCALLS)];
    size_t n = 0;
    *out = (struct seccomp_filter){0};
    if (set_numbers(names, "the agent's allowlist", true, nrs, &n, f) < 0)
        return -1;
    return emit(nrs, n, RET_ALLOW, RET_KILL_PROCESS, RET_KILL_PROCESS, out, f);
}

void seccomp_filter_free(struct seccomp_filter *filter)
{
    free(filter->insns);
    *filter = (struct seccomp_filter){0};
}

int seccomp_install(const struct seccomp_filter *filter, struct failure *f)
{
    struct {
        unsigned short len;
        const struct bpf_insn *filter;
    } prog = {(unsigned short)filter->len, filter->insns};
    if (!filter->insns)
        return 0;
    if (prctl(PR_SET_SECCOMP, MODE_FILTER, &prog, 0, 0) < 0)
        return failf(f, "seccomp", errno, "install the seccomp filter: %s", strerror(errno));
    return 0;
}
