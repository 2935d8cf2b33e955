"""--net default's per-pod link work with interface ioctls (kvmpod/net/ifioctl.py, kvmpod/net/bridge.py):
a pod on a bridge that is ready imports no pyroute2, its tap ends up where netlink says it should, and
a bridge that is not ready is made by pyroute2 — even from a running event loop. Each test runs in a
network namespace of its own (`unshare --net`): no link touches the machine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or not Path("/dev/net/tun").exists()
                                or shutil.which("nft") is None and not Path("/usr/sbin/nft").exists(),
                                reason="links need root, /dev/net/tun, nft and unshare (a network namespace of the "
                                       "test's own)")


def in_own_netns(code: str, tmp_path: Path) -> str:
    env = {**os.environ, "KVMPOD_RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


NETWORK = """
    import ipaddress
    from kvmpod.net import bridge, ifioctl
    net = bridge.DefaultNetwork(ipaddress.IPv4Network("172.16.28.0/24"), ipaddress.IPv4Address("172.16.28.1"))
    def ip(*args):
        import subprocess
        subprocess.run(["ip", *args], check=True)
"""


def test_bridge_ready_only_when_up_with_the_gateway_as_its_primary_address(tmp_path):
    out = in_own_netns(NETWORK + """
    print("absent:", bridge.bridge_ready(net))
    ip("link", "add", "kvmpod0", "type", "bridge")
    print("no address:", bridge.bridge_ready(net))
    ip("addr", "add", "172.16.28.1/24", "dev", "kvmpod0")
    print("down:", bridge.bridge_ready(net))
    ip("link", "set", "kvmpod0", "up")
    print("ready:", bridge.bridge_ready(net), ifioctl.primary_ipv4("kvmpod0"))
    ip("addr", "flush", "dev", "kvmpod0")
    ip("addr", "add", "172.16.28.1/16", "dev", "kvmpod0")
    print("other prefix:", bridge.bridge_ready(net))
    """, tmp_path)
    assert "absent: False" in out and "no address: False" in out and "down: False" in out
    assert "ready: True 172.16.28.1/24" in out and "other prefix: False" in out


def test_a_pod_on_a_ready_bridge_imports_no_pyroute2_and_its_tap_is_a_port_of_it(tmp_path):
    out = in_own_netns(NETWORK + """
    import os, subprocess, sys
    bridge.ensure_bridge(net)   # made with pyroute2, in a thread of its own
    code = '''
    import json, os, sys
    from kvmpod.net import bridge
    a = bridge.attach("0123abcd-0000-4000-8000-000000000000", "02:00:00:00:00:01", "eth0", [], lambda o: True)
    print("pyroute2:", "pyroute2" in sys.modules)
    print("ip:", a.record["ip"], "tap:", a.record["tap"])
    os.set_inheritable(a.tap_fd, True)
    os.execvp("ip", ["ip", "-j", "-d", "link", "show", a.record["tap"]])
    '''
    subprocess.run([sys.executable, "-c", code], check=True)
    """, tmp_path)
    assert "pyroute2: False" in out
    assert "ip: 172.16.28.2 tap: kvtap0123abcd" in out
    import json
    link = json.loads(out[out.index("["):])[0]
    assert link["master"] == "kvmpod0" and link["mtu"] == 1500 and "UP" in link["flags"]


def test_the_bridge_is_made_from_inside_a_running_event_loop(tmp_path):
    # a --detach'ed or OCI-created pod plans from a running loop; pyroute2's own loop must not meet it
    out = in_own_netns(NETWORK + """
    import asyncio
    async def main():
        bridge.ensure_bridge(net)
    asyncio.run(main())
    print("ready:", bridge.bridge_ready(net))
    """, tmp_path)
    assert "ready: True" in out


def test_link_errors_name_the_link_in_one_line(tmp_path):
    out = in_own_netns(NETWORK + """
    from kvmpod.errors import NetworkError
    from kvmpod.net.tap import open_tap
    fd = open_tap("kvtaperr0")
    for call in (lambda: ifioctl.add_to_bridge("lo", "kvtaperr0"), lambda: ifioctl.add_to_bridge("lo", "nosuch0"),
                 lambda: ifioctl.set_up("nosuch0"), lambda: ifioctl.flags("x" * 16)):
        try:
            call()
        except NetworkError as e:
            print("error:", e)
    print("flags of a missing link:", ifioctl.flags("nosuch0"), "address of one without:", ifioctl.primary_ipv4("kvtaperr0"))
    """, tmp_path)
    assert "error: attach kvtaperr0 to bridge lo: Operation not supported" in out
    assert "error: attach nosuch0 to lo: no such link" in out
    assert "error: bring up nosuch0: no such link" in out
    assert "error: link name 'xxxxxxxxxxxxxxxx' is longer than 15 bytes" in out
    assert "flags of a missing link: None address of one without: None" in out
