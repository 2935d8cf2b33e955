/* C unit tests of the agent's network parsers (make -C guest-agent test): the MAC and ADDRESS/PREFIX
 * forms of NETWORK's fields. tests/e2e/test_net.py checks the whole NETWORK path in real guests. */

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "net.h"

static int failures, checks;

#define CHECK(cond)                                                                                           \
    do {                                                                                                      \
        checks++;                                                                                             \
        if (!(cond)) {                                                                                        \
            failures++;                                                                                       \
            fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond);                                 \
        }                                                                                                     \
    } while (0)

static void test_macs(void)
{
    unsigned char mac[6];
    CHECK(net_parse_mac("02:aa:BB:0c:dd:ff", mac) && mac[0] == 0x02 && mac[2] == 0xbb && mac[5] == 0xff);
    const char *bad[] = {"", "02:aa:bb:cc:dd", "02:aa:bb:cc:dd:ee:ff", "02-aa-bb-cc-dd-ee", "02:aa:bb:cc:dd:eg",
                         "2:aa:bb:cc:dd:eee", " 2:aa:bb:cc:dd:ee", "+2:aa:bb:cc:dd:ee", "02:aa:bb:cc:dd:e"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        CHECK(!net_parse_mac(bad[i], mac));
}

static void test_cidrs(void)
{
    int family;
    unsigned char addr[16];
    unsigned prefix;
    CHECK(net_parse_cidr("172.16.28.2/24", &family, addr, &prefix) && family == AF_INET && prefix == 24 &&
          addr[0] == 172 && addr[3] == 2);
    CHECK(net_parse_cidr("0.0.0.0/0", &family, addr, &prefix) && prefix == 0);
    CHECK(net_parse_cidr("fd00::2/64", &family, addr, &prefix) && family == AF_INET6 && prefix == 64 &&
          addr[0] == 0xfd && addr[15] == 2);
    const char *bad[] = {"172.16.28.2", "172.16.28.2/33", "fd00::2/129", "172.16.28.2/", "/24", "1.2.3/24",
                         "172.16.28.2/2x", "172.16.28.2/-1", "nope/8", "172.16.28.2/0024"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        CHECK(!net_parse_cidr(bad[i], &family, addr, &prefix));
}

int main(void)
{
    test_macs();
    test_cidrs();
    printf("test_net: %d checks, %d failures\n", checks, failures);
    return failures != 0;
}
