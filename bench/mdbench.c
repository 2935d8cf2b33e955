/* The metadata latency benchmark's app (bench/firstrun.py): N requests to the appc metadata service,
 * one after the other, each timed from connect() to the answer's last byte with CLOCK_MONOTONIC. Only
 * differences within one request are used: early after a restore the guest clock's absolute value lags,
 * its rate does not. Prints "MDLAT <status> <us> <status> <us> ..." on one line.
 * Usage: mdbench [N]   (AC_METADATA_URL from the environment) */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *const paths[] = {
    "/acMetadata/v1/pod/uuid",
    "/acMetadata/v1/pod/manifest",
    "/acMetadata/v1/pod/annotations",
    "/acMetadata/v1/apps/mdbench/image/id",
    "/acMetadata/v1/apps/mdbench/image/manifest",
    "/acMetadata/v1/apps/mdbench/annotations",
    NULL, /* POST /acMetadata/v1/pod/hmac/sign */
};
#define NPATHS (sizeof paths / sizeof paths[0])

static char resp[1 << 20];

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 20;
    const char *url = getenv("AC_METADATA_URL");
    if (!url || strncmp(url, "http://", 7) != 0) {
        fprintf(stderr, "mdbench: no AC_METADATA_URL\n");
        return 2;
    }
    const char *hp = url + 7, *slash = strchr(hp, '/'), *colon = strchr(hp, ':');
    if (!slash || !colon || colon > slash) {
        fprintf(stderr, "mdbench: bad AC_METADATA_URL %s\n", url);
        return 2;
    }
    int port = atoi(colon + 1);
    const char *token = slash; /* "/TOKEN" */
    signal(SIGPIPE, SIG_IGN);
    printf("MDLAT");
    for (int i = 0; i < n; i++) {
        char req[512];
        const char *path = paths[i % NPATHS];
        int rlen = path ? snprintf(req, sizeof req, "GET %s%s HTTP/1.0\r\n\r\n", token, path)
                        : snprintf(req, sizeof req,
                                   "POST %s/acMetadata/v1/pod/hmac/sign HTTP/1.0\r\n"
                                   "Content-Type: application/x-www-form-urlencoded\r\n"
                                   "Content-Length: 19\r\n\r\ncontent=hello+world", token);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                                 .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            perror("mdbench: connect");
            return 2;
        }
        ssize_t w = write(fd, req, (size_t)rlen), r;
        size_t len = 0;
        while (len < sizeof resp && (r = read(fd, resp + len, sizeof resp - len)) > 0)
            len += (size_t)r;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        close(fd);
        long us = (t1.tv_sec - t0.tv_sec) * 1000000L + (t1.tv_nsec - t0.tv_nsec) / 1000;
        int status = (w == rlen && len > 12 && strncmp(resp, "HTTP/1.", 7) == 0) ? atoi(resp + 9) : 0;
        printf(" %d %ld", status, us);
    }
    printf("\n");
    return 0;
}
