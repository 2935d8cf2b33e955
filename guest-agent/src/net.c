#include "net.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "protocol.h"
#include "messages.h"

/* rtnetlink's ABI (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h): musl carries no linux/
 * headers, and these structures and numbers are fixed for good. */
struct nl_header {
    uint32_t len;
    uint16_t type, flags;
    uint32_t seq, pid;
};
struct nl_error {
    int error;
    struct nl_header msg;
};
struct sockaddr_netlink {
    sa_family_t family;
    unsigned short pad;
    uint32_t pid, groups;
};
struct if_info {
    unsigned char family, pad;
    unsigned short type;
    int index;
    unsigned flags, change;
};
struct if_addr {
    uint8_t family, prefixlen, flags, scope;
    uint32_t index;
};
struct rt_msg {
    unsigned char family, dst_len, src_len, tos, table, protocol, scope, type;
    unsigned flags;
};
struct rt_attr {
    unsigned short len, type;
};
enum {
    NETLINK_ROUTE_KP = 0,
    NLMSG_ERROR_KP = 2,
    NLM_F_REQUEST_KP = 1,
    NLM_F_ACK_KP = 4,
    NLM_F_EXCL_KP = 0x200,
    NLM_F_CREATE_KP = 0x400,
    RTM_NEWLINK_KP = 16,
    RTM_NEWADDR_KP = 20,
    RTM_NEWROUTE_KP = 24,
    IFLA_ADDRESS_KP = 1,
    IFLA_IFNAME_KP = 3,
    IFLA_MTU_KP = 4,
    IFA_ADDRESS_KP = 1,
    IFA_LOCAL_KP = 2,
    IFA_F_NODAD_KP = 0x02,
    RTA_DST_KP = 1,
    RTA_OIF_KP = 4,
    RTA_GATEWAY_KP = 5,
    RT_TABLE_MAIN_KP = 254,
    RTPROT_BOOT_KP = 3,
    RT_SCOPE_UNIVERSE_KP = 0,
    RT_SCOPE_LINK_KP = 253,
    RTN_UNICAST_KP = 1,
    RTNH_F_ONLINK_KP = 4,
};

#define MAX_IFACES 8
#define RESOLV_MAX 4096
#define HOSTS_MAX 16384
#define NET_DIR "/sys/class/net"
#define IFACE_TIMEOUT_MS 5000u

static bool configured;
static char resolv[RESOLV_MAX];
static bool have_resolv;
static char hosts[HOSTS_MAX];
static size_t hosts_len;

struct iface {
    unsigned char mac[6];
    char name[IF_NAMESIZE];
    int index;
};
static struct iface ifaces[MAX_IFACES];
static size_t n_ifaces;

/* --- parsing --- */

bool net_parse_mac(const char *text, unsigned char mac[6])
{
    unsigned v[6];
    char tail;
    if (strlen(text) != 17 ||
        sscanf(text, "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &tail) != 6)
        return false;
    for (int i = 0; i < 6; i++) {
        if (text[i * 3] == ' ' || text[i * 3] == '+' || text[i * 3] == '-')
            return false;
        mac[i] = (unsigned char)v[i];
    }
    return true;
}

bool net_parse_cidr(const char *text, int *family, unsigned char addr[16], unsigned *prefix)
{
    char buf[INET6_ADDRSTRLEN + 8];
    const char *slash = strchr(text, '/');
    if (!slash || (size_t)(slash - text) >= INET6_ADDRSTRLEN)
        return false;
    memcpy(buf, text, (size_t)(slash - text));
    buf[slash - text] = '\0';
    const char *p = slash + 1;
    if (!*p || strlen(p) > 3 || strspn(p, "0123456789") != strlen(p))
        return false;
    *prefix = (unsigned)atoi(p);
    memset(addr, 0, 16);
    if (inet_pton(AF_INET, buf, addr) == 1)
        *family = AF_INET;
    else if (inet_pton(AF_INET6, buf, addr) == 1)
        *family = AF_INET6;
    else
        return false;
    return *prefix <= (*family == AF_INET ? 32u : 128u);
}

static bool parse_gateway(const char *text, int family, unsigned char gw[16])
{
    memset(gw, 0, 16);
    return inet_pton(family, text, gw) == 1;
}

/* "MAC REST": the interface the line is about and the rest after one space. */
static struct iface *iface_of(char *line, char **rest)
{
    char *space = strchr(line, ' ');
    if (!space)
        return NULL;
    *space = '\0';
    *rest = space + 1;
    unsigned char mac[6];
    if (!net_parse_mac(line, mac))
        return NULL;
    for (size_t i = 0; i < n_ifaces; i++)
        if (memcmp(ifaces[i].mac, mac, 6) == 0)
            return &ifaces[i];
    return NULL;
}

/* --- rtnetlink --- */

struct nl_request {
    struct nl_header h;
    union {
        struct if_info link;
        struct if_addr addr;
        struct rt_msg route;
    } body;
    uint8_t attrs[256];
};

static void nl_attr(struct nl_request *r, unsigned short type, const void *data, size_t len)
{
    size_t at = (r->h.len + 3u) & ~3u;
    struct rt_attr a = {.len = (unsigned short)(sizeof a + len), .type = type};
    uint8_t *base = (uint8_t *)r;
    if (at + sizeof a + len > sizeof *r)
        fatal("network", E2BIG, "netlink request too large");
    memcpy(base + at, &a, sizeof a);
    memcpy(base + at + sizeof a, data, len);
    r->h.len = (uint32_t)(at + sizeof a + len);
}

/* Sends one request and waits for its acknowledgement: 0, or -1 with errno from the kernel. */
static int nl_talk(int sock, struct nl_request *r)
{
    static uint32_t seq;
    r->h.flags |= NLM_F_REQUEST_KP | NLM_F_ACK_KP;
    r->h.seq = ++seq;
    if (send(sock, r, r->h.len, 0) < 0)
        return -1;
    for (;;) {
        union {
            struct nl_header h;
            uint8_t bytes[8192];
        } reply;
        ssize_t n = recv(sock, &reply, sizeof reply, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        for (size_t at = 0; at + sizeof(struct nl_header) <= (size_t)n;) {
            struct nl_header h;
            memcpy(&h, reply.bytes + at, sizeof h);
            if (h.len < sizeof h || at + h.len > (size_t)n)
                break;
            if (h.type == NLMSG_ERROR_KP && h.seq == seq && h.len >= sizeof h + sizeof(int)) {
                int error;
                memcpy(&error, reply.bytes + at + sizeof h, sizeof error);
                if (error == 0)
                    return 0;
                errno = -error;
                return -1;
            }
            at += (h.len + 3u) & ~3u;
        }
    }
}

/* Name, MTU and (when `mac` is not NULL) the MAC address, while the link is still down; then up. */
static void link_setup(int sock, const struct iface *i, const char *name, unsigned mtu, const unsigned char *mac)
{
    struct nl_request r = {.h = {.len = sizeof(struct nl_header) + sizeof(struct if_info), .type = RTM_NEWLINK_KP}};
    r.body.link = (struct if_info){.family = AF_UNSPEC, .index = i->index};
    if (strcmp(name, i->name) != 0)
        nl_attr(&r, IFLA_IFNAME_KP, name, strlen(name) + 1);
    /* virtio-net passes the change to QEMU over its control queue (VIRTIO_NET_CTRL_MAC_ADDR_SET), whose
     * receive filter then takes frames for the new address */
    if (mac)
        nl_attr(&r, IFLA_ADDRESS_KP, mac, 6);
    if (mtu)
        nl_attr(&r, IFLA_MTU_KP, &mtu, sizeof mtu);
    if (nl_talk(sock, &r) < 0)
        fatal("network", errno, "configure %s (MTU %u, name %s%s): %s", i->name, mtu, name,
              mac ? ", new MAC" : "", strerror(errno));
    r = (struct nl_request){.h = {.len = sizeof(struct nl_header) + sizeof(struct if_info), .type = RTM_NEWLINK_KP}};
    r.body.link = (struct if_info){.family = AF_UNSPEC, .index = i->index, .flags = IFF_UP, .change = IFF_UP};
    if (nl_talk(sock, &r) < 0)
        fatal("network", errno, "bring %s up: %s", name, strerror(errno));
}

static void address_add(int sock, const struct iface *i, const char *cidr)
{
    int family;
    unsigned char addr[16];
    unsigned prefix;
    if (!net_parse_cidr(cidr, &family, addr, &prefix))
        fatal("protocol", EINVAL, "NET_ADDRESS: %.64s is not ADDRESS/PREFIX", cidr);
    size_t alen = family == AF_INET ? 4 : 16;
    struct nl_request r = {.h = {.len = sizeof(struct nl_header) + sizeof(struct if_addr), .type = RTM_NEWADDR_KP,
                                 .flags = NLM_F_CREATE_KP | NLM_F_EXCL_KP}};
    /* No duplicate address detection for IPv6: the host allocated the address, and DAD would keep
     * it unusable for a second or more after boot. */
    r.body.addr = (struct if_addr){.family = (uint8_t)family, .prefixlen = (uint8_t)prefix,
                                   .flags = family == AF_INET6 ? IFA_F_NODAD_KP : 0,
                                   .scope = RT_SCOPE_UNIVERSE_KP, .index = (uint32_t)i->index};
    nl_attr(&r, IFA_LOCAL_KP, addr, alen);
    nl_attr(&r, IFA_ADDRESS_KP, addr, alen);
    if (nl_talk(sock, &r) < 0)
        fatal("network", errno, "add address %s to %s: %s", cidr, i->name, strerror(errno));
    log_debug("%s: address %s", i->name, cidr);
}

static void route_add(int sock, const struct iface *i, char *spec)
{
    char *gateway = strchr(spec, ' ');
    if (gateway)
        *gateway++ = '\0';
    int family;
    unsigned char dst[16], gw[16];
    unsigned prefix;
    if (!net_parse_cidr(spec, &family, dst, &prefix))
        fatal("protocol", EINVAL, "NET_ROUTE: %.64s is not DESTINATION/PREFIX", spec);
    if (gateway && !parse_gateway(gateway, family, gw))
        fatal("protocol", EINVAL, "NET_ROUTE %s: gateway %.64s is not an address of the same family", spec, gateway);
    size_t alen = family == AF_INET ? 4 : 16;
    struct nl_request r = {.h = {.len = sizeof(struct nl_header) + sizeof(struct rt_msg), .type = RTM_NEWROUTE_KP,
                                 .flags = NLM_F_CREATE_KP | NLM_F_EXCL_KP}};
    /* IPv4 gateways are on-link by declaration: CNI plugins may hand out a gateway outside the
     * address's subnet (e.g. ptp), which the kernel would otherwise refuse. */
    r.body.route = (struct rt_msg){.family = (unsigned char)family, .dst_len = (unsigned char)prefix,
                                   .table = RT_TABLE_MAIN_KP, .protocol = RTPROT_BOOT_KP,
                                   .scope = gateway ? RT_SCOPE_UNIVERSE_KP : RT_SCOPE_LINK_KP,
                                   .type = RTN_UNICAST_KP,
                                   .flags = gateway && family == AF_INET ? RTNH_F_ONLINK_KP : 0};
    if (prefix)
        nl_attr(&r, RTA_DST_KP, dst, alen);
    if (gateway)
        nl_attr(&r, RTA_GATEWAY_KP, gw, alen);
    uint32_t oif = (uint32_t)i->index;
    nl_attr(&r, RTA_OIF_KP, &oif, sizeof oif);
    if (nl_talk(sock, &r) < 0 && errno != EEXIST) /* EEXIST: the prefix route of an address */
        fatal("network", errno, "add route %s%s%s on %s: %s", spec, gateway ? " via " : "", gateway ? gateway : "",
              i->name, strerror(errno));
    log_debug("%s: route %s%s%s", i->name, spec, gateway ? " via " : "", gateway ? gateway : "");
}

/* The network device with MAC `want` (virtio-net probes it before the agent runs, or while its
 * module loads; a short wait covers a slow probe). */
static bool find_iface(struct iface *i, const unsigned char want[6])
{
    uint64_t deadline = boottime_ns() + (uint64_t)IFACE_TIMEOUT_MS * 1000000u;
    for (;;) {
        DIR *d = opendir(NET_DIR);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            char path[PATH_MAX], text[64];
            unsigned char mac[6];
            if (e->d_name[0] == '.' || path_join(path, sizeof path, NET_DIR "/%s/address", e->d_name) < 0 ||
                read_text_file(path, text, sizeof text) < 0 || !net_parse_mac(text, mac) || memcmp(mac, want, 6))
                continue;
            if (strlen(e->d_name) >= sizeof i->name)
                continue;
            memcpy(i->name, e->d_name, strlen(e->d_name) + 1);
            i->index = (int)if_nametoindex(e->d_name);
            closedir(d);
            return i->index > 0;
        }
        if (d)
            closedir(d);
        if (boottime_ns() > deadline)
            return false;
        sleep_ms(2);
    }
}

/* --- NETWORK --- */

static void append(char *buf, size_t cap, size_t *len, const char *a, const char *b, const char *c)
{
    int n = snprintf(buf + *len, cap - *len, "%s%s%s", a, b, c);
    if (n < 0 || (size_t)n >= cap - *len)
        fatal("protocol", E2BIG, "NETWORK: DNS settings or hosts entries longer than %zu bytes", cap);
    *len += (size_t)n;
}

static bool clean_text(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return false;
    return true;
}

/* "MAC NAME MTU [DEVICE_MAC]": the device that has DEVICE_MAC now (a VM restored from a boot snapshot
 * has the snapshot's) gets MAC; without it, the device already has MAC. */
static void add_interface(int sock, const char *text)
{
    char name[IF_NAMESIZE], tail;
    unsigned mtu;
    char mac[18], from[18] = "";
    unsigned char device_mac[6];
    if (n_ifaces == MAX_IFACES)
        fatal("protocol", E2BIG, "NETWORK: more than %d interfaces", MAX_IFACES);
    struct iface *new = &ifaces[n_ifaces];
    int got = sscanf(text, "%17s %15s %u %17s%c", mac, name, &mtu, from, &tail);
    if ((got != 3 && got != 4) || !net_parse_mac(mac, new->mac) || mtu < 68 || mtu > 65535 ||
        (got == 4 && !net_parse_mac(from, device_mac)))
        fatal("protocol", EINVAL, "NET_INTERFACE: %.64s is not MAC NAME MTU [DEVICE_MAC]", text);
    bool change = got == 4 && memcmp(device_mac, new->mac, 6) != 0;
    if (!find_iface(new, change ? device_mac : new->mac))
        fatal("network", ENODEV, "no network device with MAC %s after %u s", change ? from : mac,
              IFACE_TIMEOUT_MS / 1000);
    link_setup(sock, new, name, mtu, change ? new->mac : NULL);
    memcpy(new->name, name, sizeof name);
    n_ifaces++;
    log_debug("interface %s (%s%s%s), MTU %u", name, mac, change ? ", was " : "", change ? from : "", mtu);
}

/* The interface a NET_ADDRESS or NET_ROUTE names by its MAC; *rest: what follows the MAC. */
static struct iface *named_iface(const char *field, char *text, char **rest)
{
    struct iface *i = iface_of(text, rest);
    if (!i)
        fatal("protocol", EINVAL, "%s: %.64s does not start with a known interface's MAC", field, text);
    return i;
}

void net_handle_frame(const struct frame *f)
{
    if (configured)
        fatal("protocol", EINVAL, "a second NETWORK frame");
    configured = true;
    struct kp_network m;
    struct failure err;
    size_t resolv_len = 0, search_len = 0, options_len = 0;
    char search[512] = "", options[512] = "", *rest;
    if (kp_network_decode(&m, f->payload, f->len, &err) < 0)
        fatal_failure(&err);
    const struct kp_strs *lists[] = {&m.net_interface, &m.net_address, &m.net_route, &m.dns_nameserver,
                                     &m.dns_search, &m.dns_option, &m.hosts_entry};
    for (size_t l = 0; l < ARRAY_LEN(lists); l++)
        for (size_t i = 0; i < lists[l]->n; i++)
            if (!clean_text(lists[l]->v[i]))
                fatal("protocol", EINVAL, "NETWORK: a field holds a control character");
    int sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE_KP);
    if (sock < 0)
        fatal("network", errno, "netlink socket: %s", strerror(errno));

    /* Interfaces, then addresses, then routes: an address is on its interface before a route needs it. */
    for (size_t i = 0; i < m.net_interface.n; i++)
        add_interface(sock, m.net_interface.v[i]);
    for (size_t i = 0; i < m.net_address.n; i++) {
        const struct iface *iface = named_iface("NET_ADDRESS", m.net_address.v[i], &rest);
        address_add(sock, iface, rest);
    }
    for (size_t i = 0; i < m.net_route.n; i++) {
        const struct iface *iface = named_iface("NET_ROUTE", m.net_route.v[i], &rest);
        route_add(sock, iface, rest);
    }
    close(sock);
    for (size_t i = 0; i < m.dns_nameserver.n; i++)
        append(resolv, sizeof resolv, &resolv_len, "nameserver ", m.dns_nameserver.v[i], "\n");
    for (size_t i = 0; i < m.dns_search.n; i++)
        append(search, sizeof search, &search_len, search_len ? " " : "search ", m.dns_search.v[i], "");
    for (size_t i = 0; i < m.dns_option.n; i++)
        append(options, sizeof options, &options_len, options_len ? " " : "options ", m.dns_option.v[i], "");
    for (size_t i = 0; i < m.hosts_entry.n; i++)
        append(hosts, sizeof hosts, &hosts_len, m.hosts_entry.v[i], "\n", "");
    have_resolv = m.dns_nameserver.n || m.dns_search.n || m.dns_option.n;
    kp_network_free(&m);
    if (search_len)
        append(resolv, sizeof resolv, &resolv_len, search, "\n", "");
    if (options_len)
        append(resolv, sizeof resolv, &resolv_len, options, "\n", "");
}

const char *net_resolv_conf(void)
{
    return have_resolv ? resolv : NULL;
}

const char *net_hosts_entries(void)
{
    return hosts_len ? hosts : NULL;
}
