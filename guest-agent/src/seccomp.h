/* Seccomp filters for os/linux/seccomp-retain-set and -remove-set (spec/ace.md): a classic BPF
 * program built from syscall names with the table gen_tables.py generates at build time. */
#ifndef KVMPOD_SECCOMP_H
#define KVMPOD_SECCOMP_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

/* struct sock_filter (linux/filter.h), which musl's headers do not carry. */
struct bpf_insn {
    uint16_t code;
    uint8_t jt, jf;
    uint32_t k;
};

struct seccomp_filter {
    struct bpf_insn *insns; /* NULL: no filter */
    size_t len;
};

/* Builds the filter of a retain set or a remove set (at most one is non-NULL; both NULL: no
 * filter) with `errno_name` (NULL or "": blocked syscalls kill the process with SIGSYS). The
 * appc wildcards @appc.io/all (retain) and @appc.io/empty (remove) mean "no filter"; other
 * @-values, unknown syscall names (unless `skip_unknown`: START_FLAG_SECCOMP_SKIP_UNKNOWN, for OCI
 * profiles) and unknown errno names fail (stage "seccomp"). A retain set
 * always allows execve, exit and exit_group: the app's life cycle needs them. Runs in the agent,
 * at START; free with seccomp_filter_free(). */
int seccomp_build(char *const *retain, char *const *remove, const char *errno_name, bool skip_unknown,
                  struct seccomp_filter *out, struct failure *f);
void seccomp_filter_free(struct seccomp_filter *filter);

/* The agent's own filter for a process of its own (the metadata service): exactly the syscalls `names`
 * (those this architecture lacks are skipped), anything else kills the process with SIGSYS. */
int seccomp_allow_only(char *const *names, struct seccomp_filter *out, struct failure *f);

/* Installs the filter in the calling process (an app's child, last thing before exec; the metadata
 * service, once set up). It needs no_new_privs or CAP_SYS_ADMIN in the effective set. */
int seccomp_install(const struct seccomp_filter *filter, struct failure *f);

#endif
