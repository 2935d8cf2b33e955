"""Pod networking without a VM: flag parsing, the default choice, leases, DNS precedence, ports, the
QEMU options and the NETWORK frame (tests/e2e/test_net.py boots real pods)."""

from __future__ import annotations

import ipaddress
import multiprocessing
from pathlib import Path

import pytest

from kvmpod.agent import protocol as p
from kvmpod.errors import NetworkError, UsageError
from kvmpod.image.manifest import Port
from kvmpod.net import attach, nft, user
from kvmpod.net.ipam import LeasePool
from kvmpod.net.spec import (DnsConfig, GuestInterface, GuestNetwork, NetRequest, PortForward, PortRequest, Route,
                             default_mode, parse_net, parse_port, pod_mac, request)
from kvmpod.vm.config import Nic, VMConfig, qemu_argv


# -- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("none", ("none", ())), ("user", ("user", ())), ("default", ("default", ())),
    ("lan", ("cni", ("lan",))), ("lan,storage-net", ("cni", ("lan", "storage-net"))),
])
def test_net_forms(text, expected):
    assert parse_net(text) == expected


@pytest.mark.parametrize("text, message", [
    ("host", "cannot share the host's network namespace"),
    ("lan,user", "'user' cannot be combined"),
    ("lan,lan", "a network is named twice"),
    ("bad/name", "'bad/name' is not a network name"),
])
def test_bad_net_forms(text, message):
    with pytest.raises(UsageError, match=message):
        parse_net(text)


def test_the_default_network_depends_on_privilege_and_config(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    monkeypatch.delenv("KVMPOD_CONFIG", raising=False)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_mode() == "default"
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert default_mode() == "user"
    config = tmp_path / "kvmpod.toml"
    config.write_text('[net]\ndefault = "none"\n')
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    assert default_mode() == "none"


@pytest.mark.parametrize("text, expected", [
    ("http:8080", PortRequest("http", 8080)),
    ("http:127.0.0.1:8080", PortRequest("http", 8080, "127.0.0.1")),
])
def test_port_forms(text, expected):
    assert parse_port(text) == expected


@pytest.mark.parametrize("text, message", [
    ("http", "expected NAME:\\[HOSTIP:\\]HOSTPORT"), (":80", "expected NAME"), ("http:0", "not a port number"),
    ("http:65536", "not a port number"), ("http:::80", "expected NAME"), ("http:nope:80", "not an IPv4 address"),
    ("http:::1:80", "expected NAME"),
])
def test_bad_ports(text, message):
    with pytest.raises(UsageError, match=message):
        parse_port(text)


def test_request_rules():
    with pytest.raises(UsageError, match="--port needs a network"):
        request("none", ["http:80"], [], [], [], [])
    with pytest.raises(UsageError, match="also given to a"):
        request("user", ["a:80", "b:80"], [], [], [], [])
    with pytest.raises(UsageError, match="cannot be combined"):
        request("user", [], ["host", "1.1.1.1"], [], [], [])
    with pytest.raises(UsageError, match="must be one word"):
        request("user", [], [], ["a b"], [], [])
    with pytest.raises(UsageError, match="'bad_name!' is not a host name"):
        request("user", [], [], [], [], ["1.2.3.4=bad_name!"])
    req = request("user", ["http:80"], ["192.0.2.1", "2001:db8::1"], ["example.org"], ["ndots:2"],
                  ["192.0.2.7=db.example.org"])
    assert req.hosts_entries == ("192.0.2.7 db.example.org",) and req.dns == ("192.0.2.1", "2001:db8::1")


# -- ports --------------------------------------------------------------------------------------

def test_ports_resolve_against_the_apps():
    apps = [attach.AppPorts("web", [Port("http", "tcp", 80, 1, False)]),
            attach.AppPorts("dns", [Port("dns", "udp", 53, 2, False)])]
    got = attach.resolve_ports([PortRequest("dns", 5300), PortRequest("http", 8080, "127.0.0.1")], apps)
    assert got == [PortForward("dns", "udp", "", 5300, 53, 2), PortForward("http", "tcp", "127.0.0.1", 8080, 80)]
    with pytest.raises(UsageError, match="no app of the pod declares a port named 'ssh' \\(its ports: dns, http\\)"):
        attach.resolve_ports([PortRequest("ssh", 22)], apps)
    with pytest.raises(UsageError, match="end past 65535"):
        attach.resolve_ports([PortRequest("dns", 65535)], apps)


def test_a_port_in_use_on_the_host_is_refused_before_boot():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(NetworkError, match=f"host port tcp/{port} on 127.0.0.1 is not available"):
            attach.check_host_ports_free([PortForward("http", "tcp", "127.0.0.1", port, 80)])


def test_slirp_options_forward_each_port():
    options = user.netdev_options([PortForward("dns", "udp", "", 5300, 53, 2),
                                   PortForward("http", "tcp", "127.0.0.1", 8080, 80)])
    assert "hostfwd=udp::5300-10.0.2.15:53" in options and "hostfwd=udp::5301-10.0.2.15:54" in options
    assert "hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80" in options and "net=10.0.2.0/24" in options


def test_nft_elements_and_ruleset():
    fwds = [PortForward("http", "tcp", "", 8080, 80, 2), PortForward("x", "udp", "192.0.2.1", 53, 5353)]
    assert nft._elements(fwds, "172.16.28.5") == [
        ("ports", "tcp . 8080 : 172.16.28.5 . 80"), ("ports", "tcp . 8081 : 172.16.28.5 . 81"),
        ("ports_on", "192.0.2.1 . udp . 53 : 172.16.28.5 . 5353")]
    assert nft._elements(fwds[:1], None) == [("ports", "tcp . 8080"), ("ports", "tcp . 8081")]
    rules = nft._ruleset(ipaddress.IPv4Network("172.16.28.0/24"), "kvmpod0")
    assert "ip saddr 172.16.28.0/24 ip daddr != 172.16.28.0/24 masquerade" in rules


# -- leases -------------------------------------------------------------------------------------

def _pool(tmp_path: Path, subnet: str = "10.9.0.0/29") -> LeasePool:
    net = ipaddress.IPv4Network(subnet)
    return LeasePool(tmp_path / "default", net, next(net.hosts()))


def test_leases_round_robin_exhaust_and_free(tmp_path):
    pool = _pool(tmp_path)   # hosts .1-.6, .1 is the gateway: five addresses
    got = [str(pool.allocate(f"pod{i}", lambda owner: False)) for i in range(5)]
    assert got == ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]
    with pytest.raises(NetworkError, match="no free address left in 10.9.0.0/29"):
        pool.allocate("pod5", lambda owner: False)
    assert pool.release("pod1") == ["10.9.0.3"]
    assert str(pool.allocate("pod6", lambda owner: False)) == "10.9.0.3"
    assert pool.release("nobody") == []


def test_a_just_freed_address_is_not_reused_at_once(tmp_path):
    pool = _pool(tmp_path, "10.9.0.0/28")
    first = pool.allocate("a", lambda owner: False)
    pool.release("a")
    assert pool.allocate("b", lambda owner: False) != first


def test_leases_of_pods_that_are_gone_are_taken_back(tmp_path):
    pool = _pool(tmp_path)
    for i in range(5):
        pool.allocate(f"pod{i}", lambda owner: False)
    assert str(pool.allocate("new", lambda owner: owner == "pod2")) == "10.9.0.4"
    assert set(pool.leases().values()) == {"pod0", "pod1", "pod3", "pod4", "new"}


def _allocate_many(directory: str, start: int) -> list[str]:
    net = ipaddress.IPv4Network("10.8.0.0/24")
    pool = LeasePool(Path(directory), net, next(net.hosts()))
    return [str(pool.allocate(f"p{start + i}", lambda owner: False)) for i in range(20)]


def test_concurrent_allocations_never_share_an_address(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as workers:
        results = workers.starmap(_allocate_many, [(str(tmp_path / "net"), i * 100) for i in range(4)])
    flat = [a for r in results for a in r]
    assert len(flat) == len(set(flat)) == 80


# -- DNS and hosts ------------------------------------------------------------------------------

def test_dns_precedence(tmp_path, monkeypatch):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch a.example b.example\n"
                      "options edns0 trust-ad\n")
    monkeypatch.setattr(attach, "HOST_RESOLV_CONF", resolv)
    notices: list[str] = []
    host = DnsConfig(("192.0.2.1",), ("a.example", "b.example"), ("edns0", "trust-ad"))
    assert attach.host_dns() == host
    assert attach.guest_dns(NetRequest("default"), None, notices.append) == host
    assert attach.guest_dns(NetRequest("user"), None, notices.append) == DnsConfig(("10.0.2.3",), host.search,
                                                                                 host.options)
    cni = DnsConfig(("10.1.0.1",), ("cni.example",))
    assert attach.guest_dns(NetRequest("cni", ("lan",)), cni, notices.append) == DnsConfig(("10.1.0.1",),
                                                                                         ("cni.example",))
    assert attach.guest_dns(NetRequest("cni", ("lan",), dns=("host",)), cni, notices.append) == host
    assert attach.guest_dns(NetRequest("default", dns=("none",)), None, notices.append) is None
    assert attach.guest_dns(NetRequest("none"), None, notices.append) is None
    assert attach.guest_dns(NetRequest("default", dns=("192.0.2.9",), dns_search=("x.example",)), None,
                            notices.append) == DnsConfig(("192.0.2.9",), ("x.example",))
    assert notices == []
    resolv.write_text("nameserver 127.0.0.53\n")
    assert attach.guest_dns(NetRequest("default"), None, notices.append) == DnsConfig()
    assert len(notices) == 1 and "pass --dns" in notices[0]


def test_hosts_entries_from_the_host(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n# x\n192.0.2.5   files.example  files # the file server\n\n")
    monkeypatch.setattr(attach, "HOST_HOSTS", hosts)
    assert attach.hosts_entries(NetRequest("user", hosts_entries=("host",))) == [
        "127.0.0.1 localhost", "192.0.2.5 files.example files"]
    assert attach.hosts_entries(NetRequest("user", hosts_entries=("1.2.3.4 a",))) == ["1.2.3.4 a"]


# -- what QEMU and the agent get ----------------------------------------------------------------

def _cfg(machine: str, nics: list[Nic]) -> VMConfig:
    return VMConfig(name="t", kernel=Path("/k"), initrd=Path("/i"), cmdline="", console_log=Path("/c"),
                    machine=machine, nics=nics)


def test_qemu_gets_a_tap_fd_or_slirp():
    argv = qemu_argv(_cfg("pc", [Nic("02:00:00:00:00:01", tap_fd=7), Nic("02:00:00:00:00:02", vhost=False,
                                                                          user_options=("net=10.0.2.0/24",))]))
    joined = " ".join(argv)
    assert "-netdev tap,id=net0,fd=7,vhost=off" in joined
    assert "-device virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01,romfile=" in joined
    assert "-netdev user,id=net1,net=10.0.2.0/24" in joined
    micro = " ".join(qemu_argv(_cfg("microvm", [Nic("02:00:00:00:00:01", tap_fd=7, vhost=True)])))
    assert "-netdev tap,id=net0,fd=7,vhost=on" in micro
    assert "-device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01 " in micro + " "


def test_the_network_frame_lists_interfaces_then_files():
    eth0 = GuestInterface("02:aa:bb:cc:dd:00", "eth0", 1450, ("172.16.28.2/24", "fd00::2/64"),
                          (Route("0.0.0.0/0", "172.16.28.1"), Route("10.0.0.0/8")))
    frame = GuestNetwork([eth0], DnsConfig(("192.0.2.1",), ("example.org",), ("ndots:2",)),
                         ["192.0.2.7 db"]).frame()
    assert frame.type == p.MessageType.NETWORK and frame.stream == 0
    fields = [(p.Field(tag).name, value.decode()) for tag, value in p.iter_tlv(frame.payload)]
    assert fields == [
        ("NET_INTERFACE", "02:aa:bb:cc:dd:00 eth0 1450"),
        ("NET_ADDRESS", "02:aa:bb:cc:dd:00 172.16.28.2/24"), ("NET_ADDRESS", "02:aa:bb:cc:dd:00 fd00::2/64"),
        ("NET_ROUTE", "02:aa:bb:cc:dd:00 0.0.0.0/0 172.16.28.1"), ("NET_ROUTE", "02:aa:bb:cc:dd:00 10.0.0.0/8"),
        ("DNS_NAMESERVER", "192.0.2.1"), ("DNS_SEARCH", "example.org"), ("DNS_OPTION", "ndots:2"),
        ("HOSTS_ENTRY", "192.0.2.7 db")]
    assert GuestNetwork().frame() is None


def test_pod_macs_are_local_unicast_and_distinct():
    a, b = pod_mac("d0a4fcf1-676c-4d35-8689-6a500a1f3560", 0), pod_mac("d0a4fcf1-676c-4d35-8689-6a500a1f3560", 1)
    assert a == "02:d0:a4:fc:f1:00" and b.endswith(":01")


def test_release_without_a_record_is_a_no_op(tmp_path):
    attach.release(tmp_path)   # a pod that never had a network
    (tmp_path / attach.RECORD).write_text("{broken")
    with pytest.raises(NetworkError, match="unreadable"):
        attach.release(tmp_path)


@pytest.mark.parametrize("req, message", [
    (NetRequest("default"), "--net default needs root"),
    (NetRequest("cni", ("lan", "wan")), "--net lan,wan \\(CNI\\) needs root"),
])
def test_root_only_networks_say_so_without_root(monkeypatch, tmp_path, req, message):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(UsageError, match=message):
        attach.setup(req, "d0a4fcf1-676c-4d35-8689-6a500a1f3560", tmp_path, [], lambda line: None)
    assert list(tmp_path.iterdir()) == []
