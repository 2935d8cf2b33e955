/* AF_VSOCK sockets without the kernel's uapi headers (musl ships none): the sockaddr is a stable ABI. */
#ifndef KVMPOD_VSOCK_H
#define KVMPOD_VSOCK_H

#include <stdint.h>
#include <sys/socket.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#define VSOCK_CID_ANY 0xffffffffu
#define VSOCK_CID_HOST 2u

struct sockaddr_vm {
    sa_family_t svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_flags;
    unsigned char svm_zero[sizeof(struct sockaddr) - sizeof(sa_family_t) - sizeof(unsigned short) -
                           2 * sizeof(unsigned int) - 1];
};

/* A listening AF_VSOCK stream socket on `port` (any CID), close-on-exec; -1 with errno on failure. */
int vsock_listen(uint32_t port, int backlog);

/* SO_VM_SOCKETS_CONNECT_TIMEOUT (the _OLD one: a struct timeval on 64-bit), level AF_VSOCK. */
#define VSOCK_SO_CONNECT_TIMEOUT 6

/* A connected AF_VSOCK stream socket to cid:port, close-on-exec; -1 with errno on failure. The
 * connect waits up to timeout_s seconds for the peer's answer (0: the kernel's default, 2 s). */
int vsock_connect(uint32_t cid, uint32_t port, int timeout_s);

#endif
