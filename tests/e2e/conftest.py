"""End-to-end fixtures: every test here boots a real VM (TCG on this machine) through the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kvmpod.vm.virtiofs import VIRTIOFSD_PIDFILE_DIR
from tests.conftest import kvmpod_cmd

VM_TIMEOUT = 240


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session", autouse=True)
def boot_assets_present():
    """The VM tests need `make setup` (kernel + agent); say so instead of failing 30 times obscurely."""
    from kvmpod.boot.initrd import find_agent
    from kvmpod.boot.kernel import find_kernel
    from kvmpod.errors import KvmpodError

    try:
        find_kernel()
        find_agent()
    except KvmpodError as e:
        pytest.fail(f"boot assets missing: {e} — run `make setup` first", pytrace=False)


def qemu_pids_of(run_dir: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{run_dir}"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def qemu_user_pids_of(run_dir: str) -> list[int]:
    """Processes of QEMU's user (kvmpod-qemu, docs/security.md) started for this test session's pods."""
    out = subprocess.run(["pgrep", "-u", "kvmpod-qemu", "-f", run_dir], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def virtiofsd_pidfiles_of(run_dir: str) -> list[str]:
    """The pid files virtiofsd left for shares whose sockets were under `run_dir` (kvmpod/vm/virtiofs.py pidfile)."""
    prefix = str(Path(run_dir).absolute()).replace("/", ".") + "."
    found = VIRTIOFSD_PIDFILE_DIR.iterdir() if VIRTIOFSD_PIDFILE_DIR.is_dir() else []
    return sorted(p.name for p in found if p.name.startswith(prefix))


def virtiofsd_pids_of(run_dir: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"virtiofsd.*{run_dir}"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def cgroups_of(run_dir: str) -> list[str]:
    """The cgroups of pods (and boot snapshot makers) of this runtime dir still there, in any
    hierarchy: v1 /sys/fs/cgroup/<controller>/<parent>/*, the v2 tree's <parent>/* (kvmpod/vm/cgroup.py)."""
    from kvmpod.vm.cgroup import parent_name

    parent = parent_name(Path(run_dir))
    root = Path("/sys/fs/cgroup")
    return sorted(str(p) for pattern in (f"*/{parent}/*/", f"{parent}/*/") for p in root.glob(pattern))


MACHINE_LINKS = set(os.listdir("/sys/class/net"))  # this machine's own namespace, before any test


def machine_network_touched() -> list[str]:
    """Links a test made in the machine's own network namespace (tests must use namespaces of their own)."""
    return sorted(set(os.listdir("/sys/class/net")) - MACHINE_LINKS)


def clear_leftovers(env: dict[str, str]) -> None:
    """What a failed test left: its processes killed, then `kvmpod gc` (pod directories, cgroups, taps),
    then any cgroup still there removed."""
    run_dir = env["KVMPOD_RUN_DIR"]
    for pid in qemu_pids_of(run_dir) + qemu_user_pids_of(run_dir) + virtiofsd_pids_of(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    subprocess.run(kvmpod_cmd("gc"), env=env, capture_output=True, timeout=120)
    for path in cgroups_of(run_dir):
        with contextlib.suppress(OSError):
            os.rmdir(path)


@pytest.fixture(autouse=True)
def nothing_left_behind(kvmpod_env):
    """After every VM test: no QEMU or virtiofsd of ours, no process of QEMU's user for our pods, no pod
    directory (tests with --keep clean up themselves), no cgroup of a pod."""
    yield
    run_dir = kvmpod_env["KVMPOD_RUN_DIR"]
    deadline = time.time() + 5
    while (qemu_pids_of(run_dir) or virtiofsd_pids_of(run_dir) or qemu_user_pids_of(run_dir)) and time.time() < deadline:
        time.sleep(0.1)
    pods = Path(run_dir, "pods")
    snapshot_dir = Path(kvmpod_env["KVMPOD_SNAPSHOT_DIR"])
    left = {
        "a QEMU process outlived kvmpod": qemu_pids_of(run_dir),
        "a process of QEMU's user kvmpod-qemu outlived its pod": qemu_user_pids_of(run_dir),
        "a virtiofsd process outlived kvmpod": virtiofsd_pids_of(run_dir),
        "virtiofsd's pid file outlived its pod": virtiofsd_pidfiles_of(run_dir),
        "a pod's cgroup outlived it": cgroups_of(run_dir),
        "pod directories left": sorted(pods.iterdir()) if pods.exists() else [],
        "a boot snapshot maker left its work directory": list(Path(run_dir).glob("snapshot-*")),
        "a half-made boot snapshot is left": list(snapshot_dir.glob("*.new-*")) if snapshot_dir.exists() else [],
    }
    left = {what: found for what, found in left.items() if found}
    if left:
        clear_leftovers(kvmpod_env)   # this test fails; the next ones start clean instead of failing with it
    assert left == {}, "; ".join(f"{what}: {found}" for what, found in left.items())
    assert machine_network_touched() == [], "a test made links in the machine's own network namespace"


# A pod's apps have started when `kvmpod run --detach` returns: a server in it may not listen yet, and
# until it does a forward answers with a refusal or a reset. A curl that should reach a server tries
# again, for a minute at most.
CURL = ["curl", "-sS", "-m", "20", "--retry", "60", "--retry-all-errors", "--retry-delay", "1",
        "--retry-max-time", "60"]


class Kvmpod:
    def __init__(self, env: dict[str, str]):
        self.env = env

    def run(self, *args: str, input: bytes | None = None, timeout: float = VM_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(kvmpod_cmd("run", *args), input=input, capture_output=True, env=self.env,
                              timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(kvmpod_cmd("run", *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env)

    def wait_for_running_pod(self, proc: subprocess.Popen, timeout: float = VM_TIMEOUT) -> dict:
        pods = Path(self.env["KVMPOD_RUN_DIR"], "pods")
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert proc.poll() is None, f"kvmpod exited early: {proc.communicate()}"
            for state_file in pods.glob("*/state.json") if pods.exists() else []:
                try:
                    state = json.loads(state_file.read_text())
                except (OSError, ValueError):
                    continue
                if state.get("state") == "running":
                    return state
            time.sleep(0.1)
        raise AssertionError("pod never reached the running state")


@pytest.fixture
def kvmpod(kvmpod_env) -> Kvmpod:
    return Kvmpod(kvmpod_env)


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.decode().splitlines() if not line.startswith("kvmpod: notice:")]


def the_error(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("kvmpod: error:")]
    assert len(errors) == 1, result.stderr.decode()
    return errors[0]


def proc_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
