/* The pod's network inside the guest (docs/networking.md): NETWORK names each virtio-net device by
 * the MAC the host gave it; the agent renames it, sets its MTU, addresses and routes over rtnetlink,
 * and keeps the DNS settings and hosts entries for each app root as it is built. */
#ifndef KVMPOD_NET_H
#define KVMPOD_NET_H

#include "channel.h"
#include "util.h"

/* NETWORK: configures the interfaces at once; fatal (stage "network") if that fails, or if the frame
 * is malformed or comes twice. */
void net_handle_frame(const struct frame *f);

/* The /etc/resolv.conf NETWORK asked for, or NULL: then the image's own file stays. */
const char *net_resolv_conf(void);

/* The /etc/hosts lines NETWORK gave ("ADDRESS NAME...\n" each), or NULL: then an app gets an
 * /etc/hosts only if its image has none. */
const char *net_hosts_entries(void);

/* --- the parts without sockets, also used by guest-agent/tests --- */

/* Parses "MAC" (aa:bb:cc:dd:ee:ff, any case) into mac[6]; false if it is not one. */
bool net_parse_mac(const char *text, unsigned char mac[6]);

/* Parses "ADDRESS/PREFIX" (IPv4 or IPv6) into *family, addr (16 bytes), *prefix; false if bad. */
bool net_parse_cidr(const char *text, int *family, unsigned char addr[16], unsigned *prefix);

#endif
