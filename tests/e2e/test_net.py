"""Pod networking end to end (docs/networking.md): --net default inside network namespaces the tests
make (never the machine's own), --net user as an unprivileged user, --net none, DNS and hosts entries.

Every packet of these tests stays inside the test's namespaces or on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import CURL, VM_TIMEOUT, proc_alive, the_error

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

HTTPD = ("--exec", "/bin/httpd", "--", "-f", "-p", "80", "-h", "/etc")


@pytest.fixture(scope="module")
def web_aci(busybox_rootfs, tmp_path_factory) -> Path:
    """busybox with an appc port `http` (tcp/80)."""
    out = tmp_path_factory.mktemp("net-images") / "web.aci"
    subprocess.run(kvmpod_cmd("image", "build", "--rootfs", str(busybox_rootfs), "--name", "example.com/web",
                              "--exec", "/bin/httpd -f -p 80 -h /etc", "--port", "http:tcp:80", "-o", str(out)),
                   check=True)
    return out


class Netns:
    """A network namespace of the test's own, with kvmpod run inside it."""

    def __init__(self, env: dict[str, str]):
        self.name = f"kvt-{uuidlib.uuid4().hex[:8]}"
        self.env = env
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.ip("link", "set", "lo", "up")

    def sh(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, timeout=timeout,
                              check=check)

    def ip(self, *args: str) -> str:
        return self.sh("ip", *args).stdout.decode()

    def kvmpod(self, *args: str, timeout: float = VM_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *kvmpod_cmd(*args)], capture_output=True,
                              env=self.env, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *kvmpod_cmd(*args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env)

    def detach(self, *args: str) -> str:
        result = self.kvmpod("run", "--detach", *args)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode().strip()

    def status(self, uuid: str) -> dict:
        return json.loads(self.kvmpod("status", "--json", uuid).stdout)

    def pod_ip(self, uuid: str) -> str:
        [net] = self.status(uuid)["networks"]
        return net["ips"][0]

    def stop(self, uuid: str) -> None:
        """Stop a detached pod and remove its directory (kept for status and logs once it ends)."""
        stopped = self.kvmpod("stop", uuid)
        assert stopped.returncode == 0, stopped.stderr.decode()
        removed = self.kvmpod("rm", uuid)
        assert removed.returncode == 0, removed.stderr.decode()

    def curl(self, url: str) -> subprocess.CompletedProcess:
        return self.sh(*CURL, url, check=False)

    def leftovers(self) -> list[str]:
        """What a pod could leave in this namespace or the run dir: taps, bridge ports, map elements, leases."""
        found = [line for line in self.ip("-o", "link").splitlines() if "kvtap" in line]
        if "kvmpod0" in self.ip("-o", "link"):
            found += self.ip("-o", "link", "show", "master", "kvmpod0").splitlines()
        ruleset = self.sh("nft", "list", "table", "ip", "kvmpod", check=False).stdout.decode()
        found += [line.strip() for line in ruleset.splitlines() if "elements" in line]
        leases = Path(self.env["KVMPOD_RUN_DIR"], "net", "default")
        found += [p.name for p in leases.iterdir() if p.name[0].isdigit()] if leases.is_dir() else []
        return found

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


@pytest.fixture
def netns(kvmpod_env):
    ns = Netns(kvmpod_env)
    try:
        yield ns
        assert ns.leftovers() == [], "a pod left network state behind"
    finally:
        ns.delete()


@pytest.fixture
def peer(netns):
    """A second namespace joined to the first by a veth pair: an outside client (10.99.0.2 → 10.99.0.1)."""
    other = Netns(netns.env)
    subprocess.run(["ip", "link", "add", "kvtv0", "netns", netns.name, "type", "veth", "peer", "name", "kvtv1",
                    "netns", other.name], check=True)
    netns.ip("addr", "add", "10.99.0.1/24", "dev", "kvtv0")
    netns.ip("link", "set", "kvtv0", "up")
    other.ip("addr", "add", "10.99.0.2/24", "dev", "kvtv1")
    other.ip("link", "set", "kvtv1", "up")
    try:
        yield other
    finally:
        other.delete()


def test_default_network_address_gateway_and_pod_to_pod(netns, web_aci, busybox_aci):
    server = netns.detach("--net", "default", str(web_aci))
    try:
        server_ip = netns.pod_ip(server)
        assert server_ip.startswith("172.16.28.")
        assert f"default:{server_ip}" in netns.kvmpod("list").stdout.decode()
        assert "network default: eth0 " + server_ip in netns.kvmpod("status", server).stdout.decode()
        client = netns.kvmpod("run", "--net", "default", str(busybox_aci), "--exec", "/bin/sh", "--", "-c",
                              f"ip -4 -o addr show eth0; ping -c 1 -W 10 172.16.28.1 >/dev/null && echo gateway-ok; "
                              f"wget -q -O- http://{server_ip}/hosts")
        out = client.stdout.decode()
        assert client.returncode == 0, client.stderr.decode()
        assert "inet 172.16.28." in out and server_ip not in out.splitlines()[0]
        assert "gateway-ok" in out
        assert "127.0.0.1 localhost" in out  # the first pod's /etc/hosts, served by its httpd
        # and from the namespace's own side: the host reaches the pod on the bridge
        assert "127.0.0.1 localhost" in netns.curl(f"http://{server_ip}/hosts").stdout.decode()
    finally:
        netns.stop(server)


def test_port_forwards_reach_the_pod_from_the_host_localhost_and_outside(netns, peer, web_aci):
    uuid = netns.detach("--net", "default", "--port", "http:18080", str(web_aci))
    try:
        for url in ("http://172.16.28.1:18080/hosts", "http://127.0.0.1:18080/hosts"):
            got = netns.curl(url)
            assert b"127.0.0.1 localhost" in got.stdout, (url, got.stderr)
        got = peer.curl("http://10.99.0.1:18080/hosts")  # from outside, through prerouting DNAT
        assert b"127.0.0.1 localhost" in got.stdout, got.stderr
        taken = netns.kvmpod("run", "--net", "default", "--port", "http:18080", str(web_aci))
        assert taken.returncode == 125 and "18080" in the_error(taken)
    finally:
        netns.stop(uuid)


def test_eight_concurrent_pods_get_distinct_addresses(netns, busybox_aci):
    procs = [netns.popen("run", "--net", "default", str(busybox_aci), "--exec", "/bin/sh", "--", "-c",
                         "ip -4 -o addr show eth0") for _ in range(8)]
    addresses = []
    for proc in procs:
        out, err = proc.communicate(timeout=VM_TIMEOUT * 2)
        assert proc.returncode == 0, err.decode()
        addresses.append(out.decode().split("inet ")[1].split("/")[0])
    assert len(set(addresses)) == 8, addresses


def test_kill9_of_kvmpod_then_gc_leaves_no_network_state(netns, web_aci):
    uuid = netns.detach("--net", "default", "--port", "http:18081", str(web_aci))
    state = json.loads(Path(netns.env["KVMPOD_RUN_DIR"], "pods", uuid, "state.json").read_text())
    os.kill(state["kvmpod_pid"], signal.SIGKILL)
    deadline = time.time() + 30
    while proc_alive(state["qemu_pid"]) and time.time() < deadline:
        time.sleep(0.1)
    assert not proc_alive(state["qemu_pid"])
    assert netns.leftovers(), "expected a lease and a port forward until gc"
    assert netns.kvmpod("gc").returncode == 0
    assert netns.leftovers() == []
    assert netns.kvmpod("status", uuid).returncode != 0


def test_a_failed_start_releases_the_network(netns, web_aci):
    result = netns.kvmpod("run", "--net", "default", "--port", "http:18082", str(web_aci), "--exec", "/bin/nope")
    assert result.returncode == 127 and "/bin/nope" in the_error(result)
    assert netns.leftovers() == []


@pytest.mark.parametrize("args, message", [
    (("--port", "nope:18083"), "no app of the pod declares a port named 'nope'"),
    (("--port", "http:99999"), "'99999' is not a port number"),
    (("--net", "host"), "cannot share the host's network namespace"),
    (("--net", "none", "--port", "http:18083"), "--port needs a network"),
    (("--dns", "not-an-ip"), "--dns not-an-ip: not an IP address"),
    (("--hosts-entry", "1.2.3.4"), "is not a host name"),
])
def test_bad_network_flags_are_one_line_errors(netns, web_aci, args, message):
    result = netns.kvmpod("run", "--net", "default", *args, str(web_aci))
    assert result.returncode != 0 and message in the_error(result), result.stderr.decode()
    assert not list(Path(netns.env["KVMPOD_RUN_DIR"], "pods").glob("*"))


def test_dns_hosts_entries_and_no_network(kvmpod, busybox_aci):
    show = ("--exec", "/bin/sh", "--", "-c", "cat /etc/resolv.conf; echo ---; cat /etc/hosts; echo ---; "
                                                "ls /sys/class/net")
    result = kvmpod.run("--net", "user", "--dns", "192.0.2.53", "--dns-search", "example.org", "--dns-opt", "ndots:2",
                        "--hosts-entry", "192.0.2.7=db.example.org", "--hostname", "web1", str(busybox_aci), *show)
    resolv, hosts, links = result.stdout.decode().split("---\n")
    assert result.returncode == 0, result.stderr.decode()
    assert resolv == "nameserver 192.0.2.53\nsearch example.org\noptions ndots:2\n"
    assert hosts == "127.0.0.1 localhost\n::1 localhost\n127.0.1.1 web1\n192.0.2.7 db.example.org\n"
    assert "eth0" in links.split()
    none = kvmpod.run("--net", "none", str(busybox_aci), *show)
    resolv, hosts, links = none.stdout.decode().split("---\n")
    assert "eth0" not in links.split() and "lo" in links.split()
    assert "nameserver" not in resolv  # the image's own file (the test image has none)


@pytest.fixture
def nobody_home():
    """A home directory for user nobody (pytest's own tmp dirs are root-only)."""
    home = Path(tempfile.mkdtemp(prefix="kvmpod-nobody-"))
    home.chmod(0o755)
    os.chown(home, 65534, 65534)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_user_networking_without_root_forwards_a_port(web_aci, nobody_home):
    """--net user is the default for a user without privileges, and --port works through slirp."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    home = nobody_home
    image = home / "web.aci"
    shutil.copy(web_aci, image)
    os.chown(image, 65534, 65534)
    # its runtime dir inside the home, removed with it (without XDG_RUNTIME_DIR kvmpod would use
    # /tmp/kvmpod-65534, which outlived the test)
    runtime = home / "run"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 65534, 65534)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "kvmpod"]
    started = subprocess.run([*as_nobody, "run", "--detach", "--port", "http:127.0.0.1:18090", str(image)],
                             capture_output=True, env=env, timeout=VM_TIMEOUT, cwd=home)
    assert started.returncode == 0, started.stderr.decode()
    uuid = started.stdout.decode().strip()
    try:
        got = subprocess.run([*CURL, "http://127.0.0.1:18090/hosts"], capture_output=True)
        assert b"127.0.0.1 localhost" in got.stdout, got.stderr
        status = json.loads(subprocess.run([*as_nobody, "status", "--json", uuid], capture_output=True, env=env,
                                           cwd=home).stdout)
        assert status["networks"][0]["network"] == "user" and status["networks"][0]["ips"] == ["10.0.2.15"]
    finally:
        stopped = subprocess.run([*as_nobody, "stop", uuid], capture_output=True, env=env, timeout=60, cwd=home)
        assert stopped.returncode == 0, stopped.stderr.decode()
        removed = subprocess.run([*as_nobody, "rm", uuid], capture_output=True, env=env, timeout=60, cwd=home)
        assert removed.returncode == 0, removed.stderr.decode()
        assert list((runtime / "kvmpod" / "pods").glob("*")) == []


def test_gc_sweeps_port_forwards_no_lease_accounts_for(netns, busybox_aci):
    """A kvmpod killed between making a forward and recording it leaves a map element; gc removes it."""
    assert netns.kvmpod("run", "--net", "default", str(busybox_aci), "--exec", "/bin/true").returncode == 0
    netns.sh("nft", "add", "element", "ip", "kvmpod", "ports", "{ tcp . 18099 : 172.16.28.250 . 80 }")
    assert netns.leftovers()
    assert netns.kvmpod("gc").returncode == 0
    assert netns.leftovers() == []
