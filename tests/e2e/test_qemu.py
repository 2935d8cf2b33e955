"""Which QEMU pods run: kvmpod's own build by default (kvmpod/vm/qemu_build.py, `make qemu`), Debian's
when told to (or when the build is stale), and what its patch gives: a quiet pod's translations go back to
the host. The rest of the suite runs on the default."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from kvmpod.vm.qemu_binary import DEBIAN_QEMU, QEMU_NAME, find_qemu, qemu_dirs
from kvmpod.vm.qemu_build import missing_capabilities
from tests.conftest import kvmpod_cmd
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


def _translation_kib(pid: int) -> int:
    """Resident KiB of QEMU's writable and executable mappings: TCG's translation buffer."""
    total, in_buffer = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:   # a mapping's header line
            in_buffer = fields[1].startswith("rwx")
        elif in_buffer and fields[0] == "Rss:":
            total += int(fields[1])
    return total


# An idle guest translates ~1 MiB again after the release (its timer and idle paths); a pod that kept its
# translations holds 12 MiB or more (what its start ran)
LITTLE_KIB = 3072


def test_a_quiet_pods_qemu_gives_its_translations_back_and_the_guest_runs_on(kvmpod, busybox_aci, kvmpod_env):
    """x-kvmpod-tb-flush (kvmpod/vm/data/qemu-patches/): once the pod is quiet, TCG's code buffer goes
    back to the host; code the guest runs afterwards is translated anew, and runs right."""
    # The app blocks opening a FIFO, so the guest runs nothing meanwhile (a polling loop's forks would be
    # translated again at once); `kvmpod enter` lets it go on.
    proc = kvmpod.popen("--debug", "--net", "none", str(busybox_aci), *SH,
                        "mkfifo /tmp/go && read go < /tmp/go && echo $((6 * 7)) && ls /bin | grep -c .")
    try:
        state = kvmpod.wait_for_running_pod(proc)
        qemu = state["qemu_pid"]
        started = _translation_kib(qemu)
        deadline = time.monotonic() + 60   # a bound on a hang, not a speed: quiet comes after QUIET_FOR
        while (now := _translation_kib(qemu)) > LITTLE_KIB and time.monotonic() < deadline:
            time.sleep(0.2)
        go = subprocess.run(kvmpod_cmd("enter", state["uuid"], "--", "/bin/sh", "-c", "echo go > /tmp/go"),
                            capture_output=True, env=kvmpod_env, timeout=120)
        assert go.returncode == 0, go.stderr.decode()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=60)
    assert now <= LITTLE_KIB, f"TCG's buffer still holds {now} KiB ({started} KiB at the start): {err.decode()[-2000:]}"
    assert b"the pod is quiet: QEMU dropped its translations" in err, err.decode()[-2000:]
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = out.decode().split()
    assert lines[0] == "42" and int(lines[1]) > 50, out


def test_release_translations_false_keeps_them(kvmpod_env, busybox_aci, tmp_path):
    config = tmp_path / "keep.toml"
    config.write_text("[image]\ndiscovery = false\n\n[run]\nrelease-translations = false\n")
    keeping = Kvmpod({**kvmpod_env, "KVMPOD_CONFIG": str(config)})
    proc = keeping.popen("--debug", "--net", "none", str(busybox_aci), *SH, "sleep 600")
    try:
        state = keeping.wait_for_running_pod(proc)
        state_file = Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods", state["uuid"], "state.json")
        deadline = time.monotonic() + 60   # quiet, then handed to kvmpod-relay: past the moment of a release
        while json.loads(state_file.read_text()).get("host_process") != "kvmpod-relay" and time.monotonic() < deadline:
            time.sleep(0.2)
        kept = _translation_kib(state["qemu_pid"])
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert b"idle relay: handing the pod to" in err, err.decode()[-2000:]
    assert b"dropped its translations" not in err and kept > 4096, (kept, err.decode()[-2000:])
