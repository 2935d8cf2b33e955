"""Which QEMU pods run: kvmpod's own build by default (kvmpod/vm/qemu_build.py, `make qemu`), Debian's
when told to (or when the build is stale). The rest of the suite runs on the default."""

from __future__ import annotations

import os
from pathlib import Path

from kvmpod.vm.qemu_binary import DEBIAN_QEMU, QEMU_NAME, find_qemu, qemu_dirs
from kvmpod.vm.qemu_build import missing_capabilities
from tests.e2e.conftest import Kvmpod, stderr_lines

SH = ("--exec", "/bin/sh", "--", "-c")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_pods_run_kvmpods_own_qemu_without_transparent_huge_pages(kvmpod, busybox_aci):
    choice = find_qemu()
    assert choice.source == "kvmpod's build", f"pods would run {choice.path} ({choice.source}): run `make qemu`"
    assert missing_capabilities(choice.path) == []
    proc = kvmpod.popen(str(busybox_aci), *SH, "sleep 600")
    try:
        state = kvmpod.wait_for_running_pod(proc)
        exe = Path(os.readlink(f"/proc/{state['qemu_pid']}/exe"))
        assert exe.parent.parent in qemu_dirs() and exe.name == QEMU_NAME
        # TCG's code buffer asks for huge pages; kvmpod turns them off for QEMU (kvmpod/vm/spawn.py)
        assert _status(state["qemu_pid"])["THP_enabled"] == "0"
    finally:
        proc.terminate()  # forwarded to the app, which ends the pod
        proc.communicate(timeout=60)


def test_debian_qemu_still_runs_pods(kvmpod_env, busybox_aci):
    debian = Kvmpod({**kvmpod_env, "KVMPOD_QEMU": str(DEBIAN_QEMU)})
    for boot in ("cold", "snapshot"):  # its snapshot is its own: the binary is part of a snapshot's shape
        result = debian.run("--boot", boot, str(busybox_aci), *SH, "cat /etc/greeting; exit 3")
        assert (result.returncode, stderr_lines(result)) == (3, []), result.stderr.decode()
        assert result.stdout == b"Hello from a kvmpod VM!\n"
