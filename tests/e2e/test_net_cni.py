"""--net NAME with the real CNI plugins (docs/cni.md): a `bridge` + `host-local` conflist, end to end.

kvmpod runs inside a network namespace each test makes (never the machine's own): the bridge plugin
makes its bridge `kvcni0` there, and every packet stays between that namespace and the pod's. Each
test has its own host-local dataDir, so "DEL ran" is "the lease file is gone".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import CURL, VM_TIMEOUT, proc_alive, the_error

PLUGINS = Path("/usr/lib/cni")
NETNS_DIR = Path("/run/netns")
SUBNET, GATEWAY = "10.77.0.0/24", "10.77.0.1"
SUBNET2, GATEWAY2 = "10.78.0.0/24", "10.78.0.1"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="CNI networks and network namespaces need root"),
    pytest.mark.skipif(not all((PLUGINS / p).exists() for p in ("bridge", "host-local")),
                       reason="the CNI plugins bridge and host-local are not in /usr/lib/cni "
                              "(Debian package containernetworking-plugins)"),
]


class CniHost:
    """A namespace of the test's own standing for the host, with a CNI config dir and kvmpod run in it."""

    def __init__(self, env: dict[str, str], tmp: Path):
        self.name = f"kvcni-{uuidlib.uuid4().hex[:8]}"
        self.tmp = tmp
        self.ipam = tmp / "ipam"
        netd = tmp / "net.d"
        netd.mkdir()
        (netd / "10-testnet.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "testnet",
            "plugins": [{"type": "bridge", "bridge": "kvcni0", "isGateway": True, "ipMasq": False,
                         "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": str(self.ipam)},
                         "dns": {"nameservers": [GATEWAY], "search": ["cni.test"]}}]}))
        (netd / "20-second.conf").write_text(json.dumps({   # a single-plugin .conf, CNI 0.4.0
            "cniVersion": "0.4.0", "name": "second", "type": "bridge", "bridge": "kvcni1", "isGateway": True,
            "ipam": {"type": "host-local", "subnet": SUBNET2, "dataDir": str(self.ipam)}}))
        toml = tmp / "kvmpod.toml"
        toml.write_text(f'[net]\ncni-config-dirs = ["{netd}"]\ncni-plugin-path = ["{PLUGINS}"]\n')
        self.env = {**env, "KVMPOD_CONFIG": str(toml)}
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.sh("ip", "link", "set", "lo", "up")

    def sh(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, timeout=timeout,
                              check=check)

    def kvmpod(self, *args: str, timeout: float = VM_TIMEOUT,
               enter: str = "ip-netns-exec") -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(enter), *kvmpod_cmd(*args)], capture_output=True, env=self.env,
                              timeout=timeout)

    def prefix(self, enter: str) -> list[str]:
        """`ip netns exec` (a mount namespace of its own, as the brief of the tests has it) or nsenter
        (the network namespace only: kvmpod's namespace mounts then land in the machine's mount
        namespace, as they do when kvmpod runs on a host)."""
        if enter == "nsenter":
            return ["nsenter", f"--net={NETNS_DIR / self.name}"]
        return ["ip", "netns", "exec", self.name]

    def detach(self, *args: str, enter: str = "ip-netns-exec") -> str:
        result = self.kvmpod("run", "--detach", *args, enter=enter)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode().strip()

    def pod_ip(self, uuid: str) -> str:
        [net] = json.loads(self.kvmpod("status", "--json", uuid).stdout)["networks"]
        assert net["network"] == "testnet" and net["interface"] == "eth0"
        return net["ips"][0]

    def leases(self, network: str = "testnet") -> list[str]:
        directory = self.ipam / network
        return sorted(p.name for p in directory.iterdir() if p.name[0].isdigit()) if directory.is_dir() else []

    def veths(self) -> list[str]:
        return [line for line in self.sh("ip", "-o", "link").stdout.decode().splitlines() if "veth" in line]

    def leftovers(self, uuid: str) -> list[str]:
        """What a pod could leave: its lease, its bridge port (veth), its namespace (with its tap)."""
        found = [f"lease {lease}" for lease in self.leases()] + self.veths()
        return found + ([f"netns {netns_of(uuid)}"] if netns_of(uuid).exists() else [])

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


@pytest.fixture
def host(kvmpod_env, tmp_path):
    h = CniHost(kvmpod_env, tmp_path)
    try:
        yield h
        assert h.leases() == h.leases("second") == h.veths() == [], "a pod left CNI state behind"
    finally:
        h.delete()


def netns_of(uuid: str) -> Path:
    return NETNS_DIR / f"kvmpod-{uuid}"


def test_bridge_host_local_network_address_gateway_dns_and_del_at_the_end(host, busybox_aci, tmp_path):
    uuid_file = tmp_path / "uuid"
    result = host.kvmpod("run", "--net", "testnet", "--uuid-file-save", str(uuid_file), str(busybox_aci),
                         "--exec", "/bin/sh", "--", "-c",
                         f"ip -4 -o addr show eth0; ip route; cat /etc/resolv.conf; cat /sys/class/net/eth0/address; "
                         f"ping -c 1 -W 10 {GATEWAY} >/dev/null && echo gateway-ok")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "inet 10.77.0." in out and "/24" in out
    assert f"default via {GATEWAY} dev eth0" in out            # isGateway's gateway, as the default route
    assert f"nameserver {GATEWAY}" in out and "search cni.test" in out   # the result's dns
    assert "gateway-ok" in out
    uuid = uuid_file.read_text().strip()
    assert host.leases() == [], "CNI DEL did not release the host-local lease"
    assert not netns_of(uuid).exists()
    assert host.veths() == []


def test_long_running_pod_is_reached_from_the_host_namespace_then_stopped(host, busybox_aci):
    uuid = host.detach("--net", "testnet", str(busybox_aci),
                       "--exec", "/bin/httpd", "--", "-f", "-p", "80", "-h", "/etc")
    try:
        address = host.pod_ip(uuid)
        assert address.startswith("10.77.0.")
        assert host.leases() == [address]
        assert netns_of(uuid).exists()
        pod_dir = Path(host.env["KVMPOD_RUN_DIR"], "pods", uuid)
        assert json.loads((pod_dir / "cni-testnet.json").read_text())["ips"][0]["address"].startswith(address)
        record = json.loads((pod_dir / "net.json").read_text())
        assert record[0]["kind"] == "cni" and record[0]["networks"][0]["state"] == "added"
        ping = host.sh("busybox", "ping", "-c", "2", "-W", "10", address, check=False)
        assert ping.returncode == 0, ping.stdout.decode() + ping.stderr.decode()
        got = host.sh(*CURL, f"http://{address}/greeting", check=False)   # TCP, both ways
        assert got.stdout == b"Hello from a kvmpod VM!\n", got.stderr.decode()
        # the namespace is mounted in kvmpod's mount namespace (`ip netns exec` gave it one of its own)
        kvmpod_pid = json.loads((pod_dir / "state.json").read_text())["kvmpod_pid"]
        links = subprocess.run(["nsenter", f"--mount=/proc/{kvmpod_pid}/ns/mnt", "ip", "-n", netns_of(uuid).name,
                                "-o", "link"], capture_output=True, text=True).stdout
        assert "eth0@" in links and "tap0:" in links, links
        filters = subprocess.run(["nsenter", f"--mount=/proc/{kvmpod_pid}/ns/mnt", "tc", "-n", netns_of(uuid).name,
                                  "filter", "show", "dev", "tap0", "ingress"], capture_output=True, text=True).stdout
        assert "Egress Redirect to device eth0" in filters, filters
    finally:
        stopped = host.kvmpod("stop", uuid)
        assert stopped.returncode == 0, stopped.stderr.decode()
        assert host.kvmpod("rm", uuid).returncode == 0
    assert host.leftovers(uuid) == []


@pytest.mark.parametrize("enter", ["ip-netns-exec", "nsenter"])
def test_kill9_of_kvmpod_then_gc_runs_del(host, busybox_aci, enter):
    """With `ip netns exec` the pod's namespace dies with kvmpod's mount namespace (gc runs DEL with
    an empty CNI_NETNS); with nsenter it outlives kvmpod, as on a host (gc runs DEL in it, then unmounts it)."""
    uuid = host.detach("--net", "testnet", str(busybox_aci), "--exec", "/bin/sleep", "--", "600", enter=enter)
    state = json.loads(Path(host.env["KVMPOD_RUN_DIR"], "pods", uuid, "state.json").read_text())
    os.kill(state["kvmpod_pid"], signal.SIGKILL)
    deadline = time.time() + 30
    while proc_alive(state["qemu_pid"]) and time.time() < deadline:
        time.sleep(0.1)
    assert not proc_alive(state["qemu_pid"])
    assert len(host.leases()) == 1, "expected the lease to outlive kvmpod until gc"
    if enter == "nsenter":
        assert len(host.veths()) == 1 and netns_of(uuid).exists()
    gc = host.kvmpod("gc", enter=enter)
    assert gc.returncode == 0, gc.stderr.decode()
    assert host.leftovers(uuid) == []
    assert host.kvmpod("status", uuid).returncode != 0


def test_two_networks_give_eth0_and_eth1_and_two_pods_get_distinct_addresses(host, busybox_aci):
    show = ("--exec", "/bin/sh", "--", "-c",
            f"ip -4 -o addr show; ip route; ping -c 1 -W 10 {GATEWAY} >/dev/null && echo gw1-ok; "
            f"ping -c 1 -W 10 {GATEWAY2} >/dev/null && echo gw2-ok")
    procs = [subprocess.Popen([*host.prefix("ip-netns-exec"), *kvmpod_cmd("run", "--net", "testnet,second",
                                                                          str(busybox_aci), *show)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=host.env) for _ in range(2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=VM_TIMEOUT)
        assert proc.returncode == 0, err.decode()
        outs.append(out.decode())
    addresses = set()
    for out in outs:
        eth0 = next(line for line in out.splitlines() if " eth0 " in line and "inet " in line)
        eth1 = next(line for line in out.splitlines() if " eth1 " in line and "inet " in line)
        assert "inet 10.77.0." in eth0 and "inet 10.78.0." in eth1
        addresses |= {eth0.split("inet ")[1].split("/")[0], eth1.split("inet ")[1].split("/")[0]}
        assert f"default via {GATEWAY} dev eth0" in out and "default via 10.78" not in out   # one default route
        assert "gw1-ok" in out and "gw2-ok" in out
    assert len(addresses) == 4, outs
    assert host.leases("testnet") == [] and host.leases("second") == []


def test_a_failed_start_releases_the_cni_network(host, busybox_aci, tmp_path):
    uuid_file = tmp_path / "uuid"
    result = host.kvmpod("run", "--net", "testnet", "--uuid-file-save", str(uuid_file), str(busybox_aci),
                         "--exec", "/bin/nope")
    assert result.returncode == 127 and "/bin/nope" in the_error(result)
    assert host.leftovers(uuid_file.read_text().strip()) == []


def test_unknown_network_and_missing_plugin_are_one_line_errors(host, busybox_aci):
    result = host.kvmpod("run", "--net", "nosuchnet", str(busybox_aci))
    assert result.returncode == 125
    error = the_error(result)
    assert "no CNI network named 'nosuchnet'" in error and "(networks there: second, testnet)" in error
    (host.tmp / "net.d" / "20-broken.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "broken", "plugins": [{"type": "no-such-plugin"}]}))
    result = host.kvmpod("run", "--net", "broken", str(busybox_aci))
    assert result.returncode == 125
    assert "20-broken.conflist): plugins[0].type: no executable CNI plugin 'no-such-plugin'" in the_error(result)
    assert not list(Path(host.env["KVMPOD_RUN_DIR"], "pods").glob("*"))


def test_port_forwards_through_the_portmap_plugin(host, busybox_rootfs, tmp_path):
    """--port with a CNI network: the portMappings capability argument reaches portmap (CNI conventions)."""
    if not (PLUGINS / "portmap").exists():
        pytest.skip(f"the CNI plugin portmap is not in {PLUGINS}")
    netd = host.tmp / "net.d"
    (netd / "30-webnet.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "webnet",
        "plugins": [{"type": "bridge", "bridge": "kvcni2", "isGateway": True, "ipMasq": False,
                     "ipam": {"type": "host-local", "subnet": "10.79.0.0/24", "dataDir": str(host.ipam)}},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    web = tmp_path / "web.aci"
    subprocess.run(kvmpod_cmd("image", "build", "--rootfs", str(busybox_rootfs), "--name", "example.com/web",
                              "--exec", "/bin/httpd -f -p 80 -h /etc", "--port", "http:tcp:80", "-o", str(web)),
                   check=True)
    refused = host.kvmpod("run", "--net", "testnet", "--port", "http:18085", str(web))
    assert refused.returncode == 125 and "no plugin of that network has the portMappings capability" in \
        the_error(refused)
    uuid = host.detach("--net", "webnet", "--port", "http:18085", str(web))
    try:
        got = host.sh(*CURL, "http://10.79.0.1:18085/hosts", check=False)
        assert b"127.0.0.1 localhost" in got.stdout, got.stderr
    finally:
        assert host.kvmpod("stop", uuid).returncode == 0
        assert host.kvmpod("rm", uuid).returncode == 0
    assert b"18085" not in host.sh("iptables-save", "-t", "nat").stdout  # portmap's DEL ran
    assert host.leases("webnet") == []
