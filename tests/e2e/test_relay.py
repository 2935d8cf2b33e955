"""The idle relay end to end (kvmpod/pod/relay.py, kvmpod/relay/relay.c): a quiet pod's kvmpod
process becomes kvmpod-relay and comes back as kvmpod for whatever needs it. Real VMs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kvmpod.errors import EXIT_KVMPOD_FAILURE
from kvmpod.pod.handover import HANDOVER_FORMAT, HANDOVER_VERSION
from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import VM_TIMEOUT, Kvmpod, qemu_pids_of
from tests.e2e.test_interact import SERVICE, pods  # noqa: F401 (fixture)


@pytest.fixture
def kvmpod(kvmpod_env):
    """kvmpod runs whose pods end with the test even when it fails (two signals: the second kills the VM)."""
    runs = Kvmpod(kvmpod_env)
    started: list[subprocess.Popen] = []
    popen = runs.popen
    runs.popen = lambda *args: started.append(popen(*args)) or started[-1]  # type: ignore[method-assign]
    yield runs
    for proc in started:
        for _ in range(2):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def exe_name(pid: int) -> str:
    return Path(os.readlink(f"/proc/{pid}/exe")).name


def wait_for_host(state_file: Path, want: str, timeout: float = 60, handovers: int = 1) -> dict:
    """state.json once its host_process is `want` (kvmpod-relay or kvmpod), after `handovers` hand-overs.
    kvmpod writes kvmpod-relay just before its exec: on a loaded machine the exec may lag the write, so
    for the relay the process itself must have become it too."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("host_process") == want and state.get("relay_handovers", 0) >= handovers:
            try:
                if want != "kvmpod-relay" or exe_name(state["kvmpod_pid"]) == want:
                    return state
            except (OSError, KeyError):
                pass
        time.sleep(0.1)
    raise AssertionError(f"{state_file}: host_process never became {want!r}")


def running_pod(kvmpod_env: dict[str, str], proc: subprocess.Popen) -> Path:
    pods_dir = Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods")
    deadline = time.time() + VM_TIMEOUT
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for state_file in pods_dir.glob("*/state.json") if pods_dir.exists() else []:
            return state_file
        time.sleep(0.05)
    raise AssertionError("no pod directory")


def test_quiet_pod_is_relayed_and_every_byte_and_status_arrives(kvmpod, busybox_aci, kvmpod_env):
    # two apps: the first writes now and then and exits 3 while the pod is relayed, the second later
    ticker = ("for i in 1 2 3 4; do echo tick $i; echo err $i >&2; sleep 1.5; done; "
              "head -c 300000 /dev/zero | tr '\\0' x; echo; exit 3")
    proc = kvmpod.popen(str(busybox_aci), "--exec", "/bin/sh", "--name", "ticker", "--", "-c", ticker,
                        "---", str(busybox_aci), "--exec", "/bin/sh", "--name", "sleeper", "--", "-c",
                        "sleep 9; echo sleeper done")
    state_file = running_pod(kvmpod_env, proc)
    state = wait_for_host(state_file, "kvmpod-relay")
    assert exe_name(proc.pid) == "kvmpod-relay"
    assert state["kvmpod_pid"] == proc.pid and state["state"] == "running"
    out, err = proc.communicate(timeout=VM_TIMEOUT)
    assert proc.returncode == 3, err
    lines = out.decode().splitlines()
    assert [line for line in lines if line.startswith("tick")] == [f"tick {i}" for i in range(1, 5)]
    assert "x" * 300000 in lines and "sleeper done" in lines
    assert [line for line in err.decode().splitlines() if line.startswith("err")] == [f"err {i}" for i in range(1, 5)]


def test_a_signal_to_the_relay_reaches_the_apps(kvmpod, busybox_aci, kvmpod_env):
    proc = kvmpod.popen(str(busybox_aci), *SERVICE)
    wait_for_host(running_pod(kvmpod_env, proc), "kvmpod-relay")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=VM_TIMEOUT)
    assert proc.returncode == 0, err
    assert out.decode().splitlines() == ["up", "got TERM"]


def test_enter_stop_and_logs_of_a_relayed_detached_pod(pods, busybox_aci):  # noqa: F811
    uuid = pods.detach(str(busybox_aci), *SERVICE)
    state_file = pods.pod_dir(uuid) / "state.json"
    state = wait_for_host(state_file, "kvmpod-relay")
    result = pods.cmd("enter", uuid, "--", "/bin/sh", "-c", "echo inside; exit 4")
    assert (result.returncode, result.stdout) == (4, b"inside\n"), result.stderr
    # back to the relay once quiet again: the same process, a second time
    wait_for_host(state_file, "kvmpod-relay", handovers=2)
    assert exe_name(state["kvmpod_pid"]) == "kvmpod-relay"
    assert pods.cmd("stop", uuid).returncode == 0
    logs = pods.cmd("logs", uuid)
    assert logs.stdout.decode().splitlines() == ["up", "to-stderr", "got TERM"], logs.stderr
    assert pods.state(uuid)["apps"][0]["exit_code"] == 0


def test_qemu_killed_under_the_relay_is_explained(kvmpod, busybox_aci, kvmpod_env):
    proc = kvmpod.popen(str(busybox_aci), *SERVICE)
    wait_for_host(running_pod(kvmpod_env, proc), "kvmpod-relay")
    (qemu,) = qemu_pids_of(kvmpod_env["KVMPOD_RUN_DIR"])
    os.kill(qemu, signal.SIGKILL)
    _, err = proc.communicate(timeout=VM_TIMEOUT)
    assert proc.returncode == 125
    assert "kvmpod: error: the VM ended before the app finished: QEMU was killed by signal 9" in err.decode()


def state_memfd(relay_pid: int) -> Path:
    """The hand-over record's memfd: `--state N` of the way back, after `--` on the relay's command line."""
    argv = Path(f"/proc/{relay_pid}/cmdline").read_bytes().split(b"\0")
    way_back = argv[argv.index(b"--") + 1:]
    return Path(f"/proc/{relay_pid}/fd/{int(way_back[way_back.index(b'--state') + 1])}")


@pytest.mark.parametrize("change, keep", [("version", False), ("version", True), ("garbage", False)])
def test_a_record_this_kvmpod_cannot_read_ends_the_pod_cleanly(kvmpod, busybox_aci, kvmpod_env, change, keep):
    # kvmpod changed while the pod sat in the relay: its record is of a version this kvmpod does not
    # read ("version"), or not even of a format it knows ("garbage": no envelope to go by)
    proc = kvmpod.popen(*(["--keep"] if keep else []), str(busybox_aci), *SERVICE)
    state_file = running_pod(kvmpod_env, proc)
    state = wait_for_host(state_file, "kvmpod-relay")
    assert state["kvmpod_pid"] == proc.pid and exe_name(proc.pid) == "kvmpod-relay"
    (qemu,) = qemu_pids_of(kvmpod_env["KVMPOD_RUN_DIR"])
    with state_memfd(proc.pid).open("r+b") as f:  # a memfd opened anew: the relay's own offset stays at 0
        record = json.loads(f.read())
        assert (record["format"], record["version"]) == (HANDOVER_FORMAT, HANDOVER_VERSION)
        record["version"] = 999
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record).encode() if change == "version" else b"\x80\x04\x95 an old pickle")
    proc.send_signal(signal.SIGTERM)  # brings kvmpod back, to read the record
    out, err = proc.communicate(timeout=VM_TIMEOUT)
    text = err.decode()
    assert proc.returncode == EXIT_KVMPOD_FAILURE == 125, text
    errors = [line for line in text.splitlines() if line.startswith("kvmpod: error:")]
    # without an envelope no one can tell whether the directory was to stay: it does, failed, for gc
    kept = keep or change == "garbage"
    reason = (f"the pod's hand-over record is version 999, this kvmpod reads version {HANDOVER_VERSION} (kvmpod was "
              f"changed while the pod was idle)" if change == "version"
              else "the pod's hand-over record is not a kvmpod hand-over record (not JSON)")
    assert errors == [f"kvmpod: error: {reason}: the pod was stopped"
                      + (f" (pod directory kept: {state_file.parent})" if kept else "")], text
    assert "Traceback" not in text and out == b"up\n"
    assert qemu_pids_of(kvmpod_env["KVMPOD_RUN_DIR"]) == [] and not Path(f"/proc/{qemu}").exists()
    audit = [json.loads(line) for line in Path(kvmpod_env["KVMPOD_AUDIT_LOG"]).read_text().splitlines()]
    assert [(r["event"], r.get("state")) for r in audit if r["uuid"] == state["uuid"]] == [("start", None),
                                                                                          ("end", "failed")]
    if kept:  # failed, with the reason, and its process gone: `kvmpod rm` (or gc) removes it
        final = json.loads(state_file.read_text())
        assert (final["state"], final["host_process"]) == ("failed", "kvmpod")
        assert final["error"].startswith(reason)
        removed = subprocess.run(kvmpod_cmd("rm", state["uuid"]), capture_output=True, env=kvmpod.env, timeout=60)
        assert removed.returncode == 0, removed.stderr
    assert not state_file.parent.exists()


def test_debug_shows_why_a_record_did_not_read(kvmpod, busybox_aci, kvmpod_env):
    proc = kvmpod.popen("--debug", str(busybox_aci), *SERVICE)
    wait_for_host(running_pod(kvmpod_env, proc), "kvmpod-relay")
    with state_memfd(proc.pid).open("r+b") as f:
        record = json.loads(f.read())
        del record["body"]["hello"]["agent_version"]
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record).encode())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=VM_TIMEOUT)
    text = err.decode()
    assert proc.returncode == 125, text
    errors = [line for line in text.splitlines() if line.startswith("kvmpod: error:")]
    assert errors == ["kvmpod: error: the pod's hand-over record does not fit this kvmpod: required field missing "
                      "@ body.hello.agent_version: the pod was stopped"], text
    assert "kvmpod: caused by: HandoverError" in text and "ClassValidationError" in text  # the chain, with --debug


def test_the_relay_can_be_turned_off(kvmpod, busybox_aci, kvmpod_env):
    kvmpod.env = {**kvmpod.env, "KVMPOD_RELAY": "off"}
    proc = kvmpod.popen(str(busybox_aci), "--exec", "/bin/sh", "--", "-c", "sleep 4; echo done")
    running_pod(kvmpod_env, proc)
    time.sleep(3)  # three times the quiet period that hands a pod over
    assert exe_name(proc.pid).startswith("python")
    out, err = proc.communicate(timeout=VM_TIMEOUT)
    assert (proc.returncode, out) == (0, b"done\n"), err


def test_a_missing_relay_binary_is_a_clear_error(kvmpod, busybox_aci, tmp_path):
    kvmpod.env = {**kvmpod.env, "KVMPOD_RELAY": str(tmp_path / "nope")}
    result = kvmpod.run(str(busybox_aci))
    assert result.returncode == 125
    assert f"$KVMPOD_RELAY names {tmp_path / 'nope'}, which is not an executable file" in result.stderr.decode()


def test_a_pod_with_a_network_is_relayed_too(kvmpod, busybox_aci, kvmpod_env):
    # user-mode networking lives in QEMU: nothing of it stays in kvmpod (no packets are sent here)
    proc = kvmpod.popen("--net", "user", "--agent-transport", "serial", str(busybox_aci), "--exec", "/bin/sh",
                        "--", "-c", "trap 'ip -4 addr show eth0; exit 5' TERM; while :; do sleep 0.1; done")
    state = wait_for_host(running_pod(kvmpod_env, proc), "kvmpod-relay")
    assert state["networks"][0]["network"] == "user"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=VM_TIMEOUT)
    assert proc.returncode == 5, err
    assert b"inet 10.0.2.15/24" in out
