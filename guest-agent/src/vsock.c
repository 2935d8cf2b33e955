#include "vsock.h"

#include <errno.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static struct sockaddr_vm vsock_addr(uint32_t cid, uint32_t port)
{
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = cid;
    a.svm_port = port;
    return a;
}

int vsock_listen(uint32_t port, int backlog)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_vm a = vsock_addr(VSOCK_CID_ANY, port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, backlog) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int vsock_connect(uint32_t cid, uint32_t port, int timeout_s)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval timeout = {.tv_sec = timeout_s};
    struct sockaddr_vm a = vsock_addr(cid, port);
    if ((timeout_s > 0 && setsockopt(fd, AF_VSOCK, VSOCK_SO_CONNECT_TIMEOUT, &timeout, sizeof timeout) < 0) ||
        connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}
