"""Pods with network interfaces restored from boot snapshots (docs/snapshot.md): user-mode networking
with a port forward, the default bridge with two pods of one shape reaching each other, CNI networks
(one and two interfaces), a given network namespace. Each pod asserts state.json's boot=snapshot, that its guest has the pod's
MAC (not the snapshot's) and that packets flow.

As in tests/e2e/test_net.py and test_net_cni.py, kvmpod runs inside network namespaces the tests make.
Each test asks for its own --memory size, so it gets a snapshot shape no other test made; a first
pod of the shape makes the snapshot (warm_up) and the pods the test looks at restore it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpod.boot.snapshot import device_macs
from tests.e2e.conftest import VM_TIMEOUT
from tests.e2e.test_net import Netns, netns, web_aci  # noqa: F401  (fixtures)
from tests.e2e.test_net_cni import GATEWAY, GATEWAY2, CniHost, host  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SH = ("--exec", "/bin/sh", "--", "-c")
SHOW_MAC = "cat /sys/class/net/eth0/address; "


def state_of(env: dict[str, str], uuid: str) -> dict:
    return json.loads(Path(env["KVMPOD_RUN_DIR"], "pods", uuid, "state.json").read_text())


def kept(ns: Netns | CniHost, *args: str) -> tuple[dict, str]:
    """`kvmpod run --keep ARGS` in the namespace: state.json and stdout; the pod directory is removed."""
    pods = Path(ns.env["KVMPOD_RUN_DIR"], "pods")
    before = set(pods.glob("*")) if pods.exists() else set()
    result = ns.kvmpod("run", "--keep", *args)
    assert result.returncode == 0, result.stderr.decode()
    (pod,) = set(pods.glob("*")) - before
    state = json.loads((pod / "state.json").read_text())
    shutil.rmtree(pod)
    return state, result.stdout.decode()


def warm_up(ns: Netns | CniHost, *args: str) -> None:
    """A first pod of the shape: the boot snapshot exists once it has run."""
    result = ns.kvmpod("run", *args, "--exec", "/bin/true")
    assert result.returncode == 0, result.stderr.decode()


def assert_restored_with_its_own_mac(state: dict, guest_mac: str) -> None:
    assert state["boot"] == "snapshot", state
    [net, *_] = state["networks"]
    assert guest_mac == net["mac"] and guest_mac not in device_macs(4), (guest_mac, net)


def test_user_networking_restores_and_its_port_forward_reaches_the_pod(netns, web_aci):
    shape = ("--memory", "216M", "--net", "user")
    warm_up(netns, *shape, str(web_aci))   # without the forward: slirp's options are the pod's, not the shape's
    state, out = kept(netns, *shape, str(web_aci), *SH,
                      SHOW_MAC + "ip -4 -o addr show eth0; ping -c 1 -W 10 10.0.2.2 >/dev/null && echo gateway-ok")
    assert_restored_with_its_own_mac(state, out.splitlines()[0])
    assert "inet 10.0.2.15/24" in out and "gateway-ok" in out
    uuid = netns.detach(*shape, "--port", "http:127.0.0.1:18097", str(web_aci))
    try:
        assert state_of(netns.env, uuid)["boot"] == "snapshot"
        got = netns.curl("http://127.0.0.1:18097/hosts")
        assert b"127.0.0.1 localhost" in got.stdout, got.stderr
    finally:
        netns.stop(uuid)


@pytest.mark.parametrize("mode, memory, address", [("user", "208M", "inet 10.0.2.15/24"),
                                                    ("default", "200M", "inet 172.16.28.")])
def test_user_and_bridge_network_pods_are_restored_by_the_planning_half(netns, web_aci, busybox_aci, mode, memory,
                                                                        address):
    # slirp needs no tap, and a bridge's tap is made and put on it with ioctls (kvmpod/net/ifioctl.py): the
    # NIC is known while planning, so QEMU restores while the second half's imports run, as with --net
    # none (kvmpod/pod/launch.py)
    shape = ("--debug", "--memory", memory, "--net", mode)
    warm_up(netns, *shape, str(web_aci))
    result = netns.kvmpod("run", *shape, "--port", "http:18098", str(web_aci), *SH, "ip -4 -o addr show eth0")
    assert result.returncode == 0, result.stderr.decode()
    assert "QEMU spawned while planning" in result.stderr.decode() and address in result.stdout.decode()
    # a pod whose planning fails (here: resolving its --port, in the network's setup) leaves no pod
    # directory, tap or lease
    pods = Path(netns.env["KVMPOD_RUN_DIR"], "pods")
    failed = netns.kvmpod("run", "--net", mode, "--port", "http:18098", str(busybox_aci))
    assert failed.returncode != 0 and "no app of the pod declares a port named 'http'" in failed.stderr.decode()
    assert not list(pods.glob("*")) if pods.exists() else True
    assert "kvtap" not in netns.ip("-o", "link")
    leases = Path(netns.env["KVMPOD_RUN_DIR"], "net", "default")
    assert not [f for f in leases.glob("*") if f.name[0].isdigit()] if leases.exists() else True   # lease files


def test_two_restored_pods_on_the_bridge_have_their_own_macs_and_reach_each_other(netns, web_aci):
    shape = ("--memory", "224M", "--net", "default")
    warm_up(netns, *shape, str(web_aci))
    server = netns.detach(*shape, str(web_aci))
    try:
        server_state = state_of(netns.env, server)
        assert server_state["boot"] == "snapshot"
        server_ip = netns.pod_ip(server)
        state, out = kept(netns, *shape, str(web_aci), *SH,
                          SHOW_MAC + "ping -c 1 -W 10 172.16.28.1 >/dev/null && echo gateway-ok; "
                          f"wget -q -O- http://{server_ip}/hosts")
        assert_restored_with_its_own_mac(state, out.splitlines()[0])
        assert state["networks"][0]["mac"] != server_state["networks"][0]["mac"]
        assert state["networks"][0]["ips"] != [server_ip]
        assert "gateway-ok" in out and "127.0.0.1 localhost" in out   # the server pod's /etc/hosts
        # and from the namespace's side of the bridge: the restored server answers at the pod's MAC
        assert b"127.0.0.1 localhost" in netns.curl(f"http://{server_ip}/hosts").stdout
        neighbours = netns.ip("neigh", "show", server_ip)
        assert server_state["networks"][0]["mac"] in neighbours, neighbours
    finally:
        netns.stop(server)


def test_cni_networks_restore_with_one_and_two_interfaces(host, busybox_aci):
    shape = ("--memory", "232M", "--net", "testnet")
    warm_up(host, *shape, str(busybox_aci))
    state, out = kept(host, *shape, str(busybox_aci), *SH,
                      SHOW_MAC + f"ip -4 -o addr show eth0; ping -c 1 -W 10 {GATEWAY} >/dev/null && echo gw1-ok")
    assert_restored_with_its_own_mac(state, out.splitlines()[0])
    assert "inet 10.77.0." in out and "gw1-ok" in out
    two = ("--memory", "232M", "--net", "testnet,second")   # two NICs: another shape
    warm_up(host, *two, str(busybox_aci))
    state, out = kept(host, *two, str(busybox_aci), *SH,
                      SHOW_MAC + "cat /sys/class/net/eth1/address; ip -4 -o addr show; "
                      f"ping -c 1 -W 10 {GATEWAY} >/dev/null && echo gw1-ok; "
                      f"ping -c 1 -W 10 {GATEWAY2} >/dev/null && echo gw2-ok")
    assert_restored_with_its_own_mac(state, out.splitlines()[0])
    assert out.splitlines()[1] == state["networks"][1]["mac"]
    assert "gw1-ok" in out and "gw2-ok" in out
    assert host.leases("testnet") == [] and host.leases("second") == []


GIVEN_POD = """
import sys
from kvmpod.net.spec import NetRequest
from kvmpod.pod.entry import run
from kvmpod.pod.options import RunOptions
from kvmpod.pod.spec import AppOverrides
image, netns, script = sys.argv[1:]
app = AppOverrides(image=image, exec="/bin/sh", args=["-c", script])
sys.exit(run([app], RunOptions(memory_mib=248, keep=True,
                               network=NetRequest(mode="netns", netns=netns, dns=("none",)))))
"""


def test_a_given_network_namespace_restores_with_its_mac_and_address(netns, busybox_aci):
    """The namespace an OCI runtime hands kvmpod (kvmpod/net/given.py): its interface's MAC, address and
    route, on a tap beside it. kvmpod-oci itself boots cold (its app root is a virtio-fs share), so the
    test drives the same RunOptions through kvmpod's entry, as kvmpod/oci_runtime/container.py does."""
    given = Netns(netns.env)
    try:
        subprocess.run(["ip", "link", "add", "eth0", "netns", given.name, "type", "veth", "peer", "name", "kvtg1",
                        "netns", netns.name], check=True)
        given.ip("addr", "add", "10.66.0.2/24", "dev", "eth0")
        given.ip("link", "set", "eth0", "up")
        given.ip("route", "add", "default", "via", "10.66.0.1")
        netns.ip("addr", "add", "10.66.0.1/24", "dev", "kvtg1")
        netns.ip("link", "set", "kvtg1", "up")
        mac = given.ip("-o", "link", "show", "eth0").split("link/ether ")[1].split()[0]
        outs, states = [], []
        for _ in range(2):   # the first makes the snapshot, the second restores it
            pods = Path(netns.env["KVMPOD_RUN_DIR"], "pods")
            before = set(pods.glob("*")) if pods.exists() else set()
            result = netns.sh(sys.executable, "-c", GIVEN_POD, str(busybox_aci), f"/run/netns/{given.name}",
                              SHOW_MAC + "ip -4 -o addr show eth0; ip route; "
                              "ping -c 1 -W 10 10.66.0.1 >/dev/null && echo peer-ok", timeout=VM_TIMEOUT, check=False)
            assert result.returncode == 0, result.stderr.decode()
            (pod,) = set(pods.glob("*")) - before
            states.append(json.loads((pod / "state.json").read_text()))
            shutil.rmtree(pod)
            outs.append(result.stdout.decode())
        assert_restored_with_its_own_mac(states[1], outs[1].splitlines()[0])
        assert outs[1].splitlines()[0] == mac
        assert "inet 10.66.0.2/24" in outs[1] and "default via 10.66.0.1" in outs[1] and "peer-ok" in outs[1]
    finally:
        given.delete()
