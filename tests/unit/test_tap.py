"""Persistent taps for the libvirt backend (kvmpod/net/tap.py, PodNetwork.persist_taps): made persistent
only once net.json says so, and removed by name at release — never while a process holds them. Each
test runs in a network namespace of its own (`unshare --net`): no tap touches the machine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or not Path("/dev/net/tun").exists(),
                                reason="taps need root, /dev/net/tun and unshare (a network namespace of the test's own)")


def in_own_netns(code: str) -> str:
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_persistent_tap_outlives_its_fd_and_is_removed_by_name_only_when_nobody_holds_it():
    out = in_own_netns("""
        import os
        from kvmpod.errors import NetworkError
        from kvmpod.net import tap
        def there():
            return os.path.exists("/sys/class/net/kvtaptest0") or "kvtaptest0" in open("/proc/net/dev").read()
        fd = tap.open_tap("kvtaptest0")
        tap.persist(fd, "kvtaptest0")
        os.close(fd)
        print("after close:", there())
        holder = tap.open_tap("kvtaptest0")   # as libvirt's QEMU holds it
        try:
            tap.remove_persistent("kvtaptest0")
        except NetworkError as e:
            print("held:", e)
        os.close(holder)
        tap.remove_persistent("kvtaptest0")
        print("removed:", not there())
        tap.remove_persistent("kvtaptest0")   # gone already: nothing to do
        print("again:", not there())
    """)
    assert "after close: True" in out
    assert "held: remove tap kvtaptest0: Device or resource busy (a process still holds it)" in out
    assert "removed: True" in out and "again: True" in out


def test_persist_taps_records_the_tap_first_and_release_removes_it(tmp_path):
    out = in_own_netns(f"""
        import json, os
        from pathlib import Path
        from kvmpod.net import attach, tap
        from kvmpod.net.spec import Attachment, GuestInterface
        pod = Path({str(tmp_path)!r})
        record = {{"kind": "bridge", "network": "default", "tap": "kvtaptest1", "forwards": []}}
        other = {{"kind": "user"}}   # another record: kept as it was
        attach._save(pod, [other, record])
        a = Attachment("default", GuestInterface("02:00:00:00:00:01", "eth0", 1500, (), ()), record,
                       tap_fd=tap.open_tap("kvtaptest1"))
        network = attach.PodNetwork(pod, [a])
        network.persist_taps()
        print("fd:", a.tap_fd)
        print("record:", json.loads((pod / "net.json").read_text()))
        print("nics:", [(n.tap_fd, n.tap_name) for n in network.nics()])
        print("there:", "kvtaptest1" in open("/proc/net/dev").read())
        attach.release(pod)
        print("gone:", "kvtaptest1" not in open("/proc/net/dev").read(), (pod / "net.json").exists())
    """)
    assert "fd: None" in out
    assert ("record: [{'kind': 'user'}, {'kind': 'bridge', 'network': 'default', 'tap': 'kvtaptest1', "
            "'forwards': [], 'persistent': True}]") in out
    assert "nics: [(None, 'kvtaptest1')]" in out and "there: True" in out
    assert "gone: True False" in out
