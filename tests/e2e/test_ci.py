"""kvmpod as the way a CI job runs (docs/ci.md): the job's checkout as a host volume, its files owned by
the runner's user on the host, its exit code as the run's, its output streamed line by line while it
runs, --timeout, a cancelled job (SIGTERM, then SIGKILL, as CI runners do), and --debug's lines.

Every pod here has --net none, except the --debug one, which runs inside a network namespace of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import VM_TIMEOUT, qemu_pids_of, the_error
from tests.e2e.test_net import netns  # noqa: F401  (the fixture: a network namespace of the test's own)

RUNNER_UID = RUNNER_GID = 4242   # the CI runner's user, who owns the checkout

JOB = """#!/bin/sh
echo "job: building in $(pwd) as $(id -u):$(id -g)"
mkdir -p build && echo artefact > build/out.txt
echo "job: waiting"
while [ ! -e go ]; do sleep 0.1; done
echo "job: tests failed"
exit 3
"""


def read_until(stream, wanted: str, seen: list[str]) -> None:
    """Lines of `stream` until one equals `wanted` (each kept in `seen`); EOF first is a failure."""
    while True:
        line = stream.readline()
        assert line, f"output ended before {wanted!r}: {seen}"
        seen.append(line.decode().rstrip("\n"))
        if seen[-1] == wanted:
            return


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A checkout-like directory owned by the runner's user, with the job's script in it."""
    src = tmp_path / "checkout"
    src.mkdir()
    (src / "ci.sh").write_text(JOB)
    (src / "README").write_text("a project\n")
    for path in (src, src / "ci.sh", src / "README"):
        os.chown(path, RUNNER_UID, RUNNER_GID)
    return src


def job_argv(checkout: Path, *pod_flags: str) -> list[str]:
    return ["run", "--net", "none", *pod_flags, "--volume", f"src,kind=host,source={checkout}"]


@pytest.mark.skipif(os.geteuid() != 0, reason="owning the checkout as another user needs root (chown)")
def test_a_ci_job_streams_its_output_exits_with_its_code_and_leaves_the_runners_files(kvmpod_env, busybox_aci,
                                                                                      checkout):
    """docs/ci.md's recipe as root: the job runs as the checkout's owner (--user/--group), so what it
    writes in the guest is the runner's on the host."""
    argv = kvmpod_cmd(*job_argv(checkout), str(busybox_aci), "--mount", "volume=src,target=/src",
                      "--working-dir", "/src", "--user", str(RUNNER_UID), "--group", str(RUNNER_GID),
                      "--exec", "/bin/sh", "--", "/src/ci.sh")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kvmpod_env)
    try:
        seen: list[str] = []
        assert proc.stdout is not None
        # the job's lines arrive while it runs: it waits for `go`, which is written only once they are read
        read_until(proc.stdout, "job: waiting", seen)
        (checkout / "go").touch()
        out, err = proc.communicate(timeout=VM_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err.decode()
    assert seen == [f"job: building in /src as {RUNNER_UID}:{RUNNER_GID}", "job: waiting"]
    assert out.decode() == "job: tests failed\n"
    for made in (checkout / "build", checkout / "build" / "out.txt"):
        st = made.stat()
        assert (st.st_uid, st.st_gid) == (RUNNER_UID, RUNNER_GID), made
    assert (checkout / "build" / "out.txt").read_text() == "artefact\n"


def test_timeout_stops_the_job_and_exits_124(kvmpod, busybox_aci):
    result = kvmpod.run("--net", "none", "--timeout", "2s", str(busybox_aci), "--exec", "/bin/sleep", "--", "60")
    assert result.returncode == 124, result.stderr.decode()
    assert the_error(result).startswith("kvmpod: error: the apps ran longer than --timeout 2 s: the pod was "
                                        "stopped (busybox killed by signal 15")
    # nothing left: the autouse fixture checks QEMU, cgroups and the pod directory


TRAPPING = ("trap 'echo app: got SIGTERM' TERM; echo app: ready; "
            "while [ ! -e /tmp/stop ]; do sleep 0.1; done")


def test_sigterm_to_a_running_job_reaches_the_app_and_the_pod_goes(kvmpod, busybox_aci):
    proc = kvmpod.popen("--net", "none", str(busybox_aci), "--exec", "/bin/sh", "--", "-c",
                        "trap 'echo app: got SIGTERM; exit 7' TERM; echo app: ready; while :; do sleep 0.1; done")
    try:
        seen: list[str] = []
        assert proc.stdout is not None
        read_until(proc.stdout, "app: ready", seen)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=VM_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.decode() == "app: got SIGTERM\n" and proc.returncode == 7, err.decode()


def test_sigterm_then_sigkill_of_a_cancelled_job_leaves_nothing_after_gc(kvmpod, busybox_aci):
    """A runner's cancel: SIGTERM (the app gets it, and ignores it), then SIGKILL before kvmpod's stop
    timeout is over. QEMU dies with kvmpod; what kvmpod could not remove itself, `kvmpod gc` does."""
    proc = kvmpod.popen("--net", "none", str(busybox_aci), "--exec", "/bin/sh", "--", "-c", TRAPPING)
    run_dir = kvmpod.env["KVMPOD_RUN_DIR"]
    try:
        seen: list[str] = []
        assert proc.stdout is not None
        read_until(proc.stdout, "app: ready", seen)
        proc.send_signal(signal.SIGTERM)
        read_until(proc.stdout, "app: got SIGTERM", seen)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while qemu_pids_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids_of(run_dir) == [], "QEMU outlived a SIGKILLed kvmpod run"
    gc = subprocess.run(kvmpod_cmd("gc"), capture_output=True, env=kvmpod.env, timeout=60)
    assert gc.returncode == 0, gc.stderr.decode()
    # nothing left: the autouse fixture checks the pod directory, cgroups, virtiofsd


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_debug_shows_kvmpods_lines_not_pyroute2s(netns, busybox_aci):  # noqa: F811
    result = netns.kvmpod("run", "--debug", "--net", "default", str(busybox_aci), "--exec", "/bin/true")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stderr.decode().splitlines()
    assert any(line.startswith("kvmpod: pod ") and " accel " in line for line in lines)
    assert any(line.startswith("kvmpod: timings: planning ") and "total" in line for line in lines)
    netlink = [line for line in lines if "pyroute2" in line or "nlmsg" in line or "'attrs'" in line]
    assert netlink == [], netlink[:3]
    assert len(result.stderr) < 64 * 1024   # a pod's debug log, not kilobytes per netlink message
