"""kvmpod as the way a CI job runs (docs/ci.md): the job's checkout as a host volume, its files owned by
the runner's user on the host, its exit code as the run's, its output streamed line by line while it
runs, --timeout, a cancelled job (SIGTERM, then SIGKILL, as CI runners do), and --debug's lines.

Every pod here has --net none, except the --debug one, which runs inside a network namespace of its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import VM_TIMEOUT, qemu_pids_of, the_error, virtiofsd_pids_of
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
def checkout() -> Iterator[Path]:
    """A checkout-like directory owned by the runner's user, with the job's script in it; where that
    user can reach it, as a runner's work directory is (pytest's own tmp dirs are root's alone)."""
    top = Path(tempfile.mkdtemp(prefix="kvmpod-ci-"))
    top.chmod(0o755)
    src = top / "checkout"
    src.mkdir()
    (src / "ci.sh").write_text(JOB)
    (src / "README").write_text("a project\n")
    for path in (src, src / "ci.sh", src / "README"):
        os.chown(path, RUNNER_UID, RUNNER_GID)
    try:
        yield src
    finally:
        shutil.rmtree(top, ignore_errors=True)


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


@pytest.mark.skipif(os.geteuid() != 0, reason="owning the checkout as another user needs root (chown)")
@pytest.mark.parametrize("owner", ["source", f"{RUNNER_UID}:{RUNNER_GID}"])
def test_a_job_that_is_root_in_the_guest_writes_the_runners_files_with_owner(kvmpod, busybox_aci, checkout, owner):
    """owner=: virtiofsd in a user namespace whose root is the runner's user, so the job may stay root
    in its VM (apt-get install...) and what it writes in the checkout is still the runner's; the
    runner's files look like root's to it."""
    (checkout / "go").touch()
    os.chown(checkout / "go", RUNNER_UID, RUNNER_GID)
    result = kvmpod.run("--net", "none", "--volume", f"src,kind=host,source={checkout},owner={owner}",
                        str(busybox_aci), "--mount", "volume=src,target=/src", "--working-dir", "/src",
                        "--exec", "/bin/sh", "--", "-c",
                        'echo "owner in the guest $(stat -c %u:%g /src/README)"; mkdir -p deep/er; '
                        'echo x > deep/er/file; ln -s file deep/er/link; touch deep/er/file2; chown 1000:1000 deep/er/file2; '
                        'sh ./ci.sh')
    assert result.returncode == 3, result.stderr.decode()
    assert result.stdout.decode().splitlines()[:2] == ["owner in the guest 0:0", "job: building in /src as 0:0"]
    for made in ("build", "build/out.txt", "deep", "deep/er", "deep/er/file"):
        st = (checkout / made).lstat()
        assert (st.st_uid, st.st_gid) == (RUNNER_UID, RUNNER_GID), made
    assert os.lstat(checkout / "deep/er/link").st_uid == RUNNER_UID
    # another guest id is itself on the host (only root is mapped to the owner)
    assert (os.stat(checkout / "deep/er/file2").st_uid, os.stat(checkout / "deep/er/file2").st_gid) == (1000, 1000)


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


@pytest.mark.parametrize("volume", [False, True])
def test_sigterm_then_sigkill_of_a_cancelled_job_leaves_nothing_after_gc(kvmpod, busybox_aci, checkout, volume):
    """A runner's cancel: SIGTERM (the app gets it, and ignores it), then SIGKILL before kvmpod's stop
    timeout is over. QEMU (and the checkout's virtiofsd, which runs as its owner) die with kvmpod; what
    kvmpod could not remove itself, `kvmpod gc` does."""
    flags = ["--volume", f"src,kind=host,source={checkout},owner=source"] if volume else []
    mounts = ["--mount", "volume=src,target=/src"] if volume else []
    proc = kvmpod.popen("--net", "none", *flags, str(busybox_aci), *mounts, "--exec", "/bin/sh", "--", "-c", TRAPPING)
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
    while virtiofsd_pids_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert virtiofsd_pids_of(run_dir) == [], "virtiofsd outlived a SIGKILLed kvmpod run"
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
