"""--net default on --backend libvirt: the pod's tap is kvmpod's (made persistent, opened by libvirtd by
name), with kvmpod's lease, MAC and nft rules; removed at the pod's end, or by `kvmpod gc` after a
SIGKILLed kvmpod. Real VMs, a real libvirtd in the test's network namespace (conftest.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.e2e.conftest import the_error
from tests.e2e.libvirtd import domains, virsh
from tests.e2e.test_net import web_aci  # noqa: F401 - a fixture: busybox with an appc port http (tcp/80)


def libvirt_args(uri: str) -> list[str]:
    return ["--backend", "libvirt", "--libvirt-uri", uri, "--net", "default"]


def test_two_libvirt_pods_on_the_bridge_get_their_lease_reach_each_other_and_a_port_forward(
        netns, libvirt_uri, web_aci, busybox_aci):  # noqa: F811 - web_aci is the fixture imported above
    server = netns.detach(*libvirt_args(libvirt_uri), "--port", "http:18080", str(web_aci))
    try:
        status = netns.status(server)
        assert status["backend"] == "libvirt"
        server_ip = netns.pod_ip(server)
        assert server_ip.startswith("172.16.28.")
        [net] = status["networks"]
        tap = f"kvtap{server.replace('-', '')[:8]}"
        assert tap in netns.ip("-o", "link", "show", "master", "kvmpod0")   # kvmpod's tap, on kvmpod's bridge
        xml = virsh(libvirt_uri, "dumpxml", status["domain"]).stdout
        assert f"dev='{tap}'" in xml and f"address='{net['mac']}'" in xml   # opened by name, kvmpod's MAC
        client = netns.kvmpod("run", *libvirt_args(libvirt_uri), str(busybox_aci), "--exec", "/bin/sh", "--", "-c",
                              "ip -4 -o addr show eth0; ip route; ping -c 1 -W 10 172.16.28.1 >/dev/null && "
                              f"echo gateway-ok; wget -q -O- http://{server_ip}/hosts")
        out = client.stdout.decode()
        assert client.returncode == 0, client.stderr.decode()
        assert "inet 172.16.28." in out and server_ip not in out.splitlines()[0]
        assert "default via 172.16.28.1" in out and "gateway-ok" in out
        assert "127.0.0.1 localhost" in out   # the first pod's /etc/hosts, served by its httpd
        # and from the namespace's own side: the host reaches the pod on the bridge
        assert "127.0.0.1 localhost" in netns.curl(f"http://{server_ip}/hosts").stdout.decode()
        # kvmpod's nft DNAT reaches the pod behind libvirt's NIC as behind the QEMU backend's
        assert "127.0.0.1 localhost" in netns.curl("http://127.0.0.1:18080/hosts").stdout.decode()
    finally:
        netns.stop(server)
    # nothing_left (conftest.py): the client's and the server's taps are gone with their pods


def test_kill9_of_kvmpod_then_gc_destroys_the_domain_and_removes_the_tap(netns, libvirt_uri, busybox_aci):
    uuid = netns.detach(*libvirt_args(libvirt_uri), str(busybox_aci), "--exec", "/bin/sleep", "--", "600")
    state = json.loads(Path(netns.env["KVMPOD_RUN_DIR"], "pods", uuid, "state.json").read_text())
    virsh(libvirt_uri, "suspend", state["domain"])   # the guest cannot power itself off when its port hangs up
    os.kill(state["kvmpod_pid"], signal.SIGKILL)
    assert state["domain"] in domains(libvirt_uri)
    tap = f"kvtap{uuid.replace('-', '')[:8]}"
    assert tap in netns.ip("-o", "link"), "the persistent tap outlives kvmpod until gc"
    gc = netns.kvmpod("gc")
    assert gc.returncode == 0, gc.stderr.decode()
    assert f"destroyed its libvirt domain {state['domain']}" in gc.stderr.decode()
    assert tap not in netns.ip("-o", "link")
    assert netns.kvmpod("status", uuid).returncode != 0


def test_a_daemon_that_is_not_there_leaves_no_tap_lease_or_pod(netns, libvirt_uri, busybox_aci, tmp_path):
    """The tap is persistent by the time kvmpod connects to libvirt: a failed start removes it too."""
    uri = f"qemu:///system?socket={tmp_path}/no-daemon-here"
    result = netns.kvmpod("run", *libvirt_args(uri), str(busybox_aci), "--exec", "/bin/true")
    assert result.returncode == 125 and uri in the_error(result)
    assert list(Path(netns.env["KVMPOD_RUN_DIR"], "pods").glob("*")) == []
    # nothing_left (conftest.py): no tap, bridge port or lease in the namespace
