"""A cgroup per pod with hard limits (kvmpod/vm/cgroup.py, docs/security.md "cgroups"), on real VMs: QEMU
and virtiofsd are in it with the limits the pod's size gives, a guest that fills its RAM does not grow
QEMU past them, a QEMU forced over its limit is reported as the OOM kill it is, and every way a pod ends
removes the cgroup (the suite's nothing_left_behind checks that after every test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import pytest

from kvmpod.image.build import build_aci
from kvmpod.image.manifest import Isolator, build_manifest
from kvmpod.vm import cgroup
from kvmpod.vm.cgroup import MIB, limits_for
from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import cgroups_of, the_error

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the pods' cgroups are made under the machine's root")

SLEEP = ["--exec", "/bin/sleep", "--", "60"]
# busybox awk doubling a string: every doubling copies it whole, so the guest's RAM fills within a second
FILL_RAM = ["--exec", "/bin/awk", "--", 'BEGIN { s = "x"; while (1) s = s s }']


def in_cgroup(pid: int) -> dict[str, str]:
    """/proc/PID/cgroup: controller ("" for the v2 tree) → cgroup path."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            found[c] = path
    return found


def limit_files(record: dict) -> dict[str, str]:
    """The limits as the kernel has them, read from the pod's cgroup directories."""
    read = {}
    for controller, where in record["controllers"].items():
        d, v2 = Path(where["path"]), where["version"] == 2
        files = {"memory": ["memory.max", "memory.swap.max"] if v2 else ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
                 "pids": ["pids.max"], "cpu": ["cpu.max"] if v2 else ["cpu.cfs_quota_us", "cpu.cfs_period_us"]}[controller]
        for name in files:
            if (d / name).exists():
                read[name] = (d / name).read_text().strip()
    return read


def running(kvmpod, *args: str) -> tuple[subprocess.Popen, dict]:
    proc = kvmpod.popen(*args)
    return proc, kvmpod.wait_for_running_pod(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)


def test_qemu_and_virtiofsd_run_in_the_pods_cgroup_with_its_limits(kvmpod, kvmpod_env, busybox_aci, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    proc, state = running(kvmpod, "--volume", f"h,kind=host,source={share}", str(busybox_aci),
                          "--mount", "volume=h,target=/h", *SLEEP)
    try:
        record = state["cgroup"]
        name = record["name"]
        assert name == f"{cgroup.parent_name(Path(kvmpod_env['KVMPOD_RUN_DIR']))}/{state['uuid']}"
        assert set(record["controllers"]) == {"memory", "pids", "cpu"}
        # QEMU, virtiofsd and virtiofsd's sandboxed child: all of them in the pod's cgroup, in every hierarchy
        members = {int(p) for where in record["controllers"].values()
                   for p in Path(where["path"], "cgroup.procs").read_text().split()}
        assert {state["qemu_pid"], *state["virtiofsd_pids"]} <= members
        for pid in members:
            assert {c: in_cgroup(pid).get(c if w["version"] == 1 else "") for c, w in record["controllers"].items()} \
                == {c: f"/{name}" for c in record["controllers"]}, Path(f"/proc/{pid}/cmdline").read_bytes()
        assert os.getpid() not in members and state["kvmpod_pid"] not in members   # kvmpod stays outside
        # the default pod: 256 MiB, one vCPU, under TCG, with one virtiofsd
        want = limits_for(256, 1, virtiofsd=1, tcg=True)
        assert record["limits"] == want.record()
        files = limit_files(record)
        v1 = record["controllers"]["memory"]["version"] == 1
        assert files[("memory.limit_in_bytes" if v1 else "memory.max")] == str(want.memory_bytes)
        assert files.get("memory.memsw.limit_in_bytes" if v1 else "memory.swap.max", "no swap accounting") in (
            str(want.memory_bytes) if v1 else "0", "no swap accounting")
        assert files["pids.max"] == str(want.pids)
        assert files.get("cpu.cfs_quota_us", files.get("cpu.max", "").split(" ")[0]) == "100000"   # its one vCPU
        # what `kvmpod status` shows of it
        status = json.loads(subprocess.run(kvmpod_cmd("status", "--json", state["uuid"]), env=kvmpod_env,
                                           capture_output=True, check=True).stdout)
        assert status["cgroup"] == record
        text = subprocess.run(kvmpod_cmd("status", state["uuid"]), env=kvmpod_env, capture_output=True,
                              text=True, check=True).stdout
        assert f"cgroup:  {name} (memory {want.memory_bytes // MIB} MiB, swap 0 MiB, pids {want.pids}, cpu 1 CPUs)" in text
    finally:
        stop(proc)


def test_a_half_cpu_isolator_is_half_a_cpus_quota(kvmpod, kvmpod_env, busybox_rootfs, tmp_path):
    aci = tmp_path / "half.aci"
    build_aci(busybox_rootfs, build_manifest("example.com/half-cpu", exec_=["/bin/sleep", "60"],
                                             isolators=[Isolator("resource/cpu", {"limit": "500m"})]), aci)
    proc, state = running(kvmpod, str(aci))
    try:
        record = state["cgroup"]
        assert record["limits"]["cpu_quota_us"] == 50_000 and record["limits"]["cpu_period_us"] == 100_000
        files = limit_files(record)
        assert files.get("cpu.cfs_quota_us") == "50000" or files.get("cpu.max") == "50000 100000"
    finally:
        stop(proc)


def test_debug_shows_the_cgroup_and_its_limits(kvmpod, busybox_aci):
    result = kvmpod.run("--debug", "--cpus", "2", "--memory", "512M", str(busybox_aci), "--exec", "/bin/true")
    assert result.returncode == 0, result.stderr
    want = limits_for(512, 2, Decimal(2), tcg=True)
    lines = [line for line in result.stderr.decode().splitlines() if line.startswith("kvmpod: cgroup ")]
    assert len(lines) == 1, result.stderr
    assert f"memory {want.memory_bytes // MIB} MiB, swap 0 MiB, pids {want.pids}, cpu 2 CPUs (200000/100000 us)" in lines[0]


@pytest.mark.parametrize("boot", ["cold", "snapshot"])
def test_a_guest_that_fills_its_ram_oom_kills_its_own_app_not_qemu(kvmpod, busybox_aci, boot):
    result = kvmpod.run("--boot", boot, str(busybox_aci), *FILL_RAM)
    assert result.returncode == 137, result.stderr   # the guest's OOM killer took the app: SIGKILL, 128 + 9
    assert b"exceeded its memory limit" not in result.stderr


@pytest.mark.parametrize("boot", ["cold", "snapshot"])
def test_a_qemu_forced_over_its_limit_is_reported_as_the_vms_oom_kill(kvmpod, kvmpod_env, busybox_aci, boot):
    kvmpod.env = {**kvmpod_env, "KVMPOD_CGROUP_MEMORY_MAX": "160M"}   # below the guest's 256 MiB: the test hook
    result = kvmpod.run("--boot", boot, "--uuid-file-save", str(Path(kvmpod_env["KVMPOD_RUN_DIR"]) / "oom.uuid"),
                        str(busybox_aci), *FILL_RAM)
    uuid = (Path(kvmpod_env["KVMPOD_RUN_DIR"]) / "oom.uuid").read_text()
    parent = cgroup.parent_name(Path(kvmpod_env["KVMPOD_RUN_DIR"]))
    assert result.returncode == 125, result.stderr
    assert the_error(result) == ("kvmpod: error: the VM ended before the app finished: the pod's VM exceeded its "
                                 f"memory limit of 160 MiB (cgroup {parent}/{uuid})")


def test_an_oom_kill_while_the_idle_relay_holds_the_pod_is_reported_too(kvmpod, kvmpod_env, busybox_aci):
    # the pod is quiet for 4 s (kvmpod-relay takes it after ~1 s), then its guest fills its RAM: the
    # kvmpod process that comes back from the relay knows the cgroup from state.json
    kvmpod.env = {**kvmpod_env, "KVMPOD_CGROUP_MEMORY_MAX": "160M"}
    proc, state = running(kvmpod, str(busybox_aci), "--exec", "/bin/sh", "--",
                          "-c", 'sleep 4; exec awk \'BEGIN { s = "x"; while (1) s = s s }\'')
    state_file = Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods", state["uuid"], "state.json")
    held = False
    deadline = time.time() + 4
    while time.time() < deadline and not held:
        held = json.loads(state_file.read_text()).get("host_process") == "kvmpod-relay"
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert held, "the pod never went to the idle relay"
    assert proc.returncode == 125, err
    assert f"the pod's VM exceeded its memory limit of 160 MiB (cgroup {state['cgroup']['name']})" in err.decode()


def test_every_end_of_a_pod_removes_its_cgroup(kvmpod, kvmpod_env, busybox_aci):
    run_dir = kvmpod_env["KVMPOD_RUN_DIR"]
    # a pod whose app is not there (it fails after boot), a panicking guest, one stopped with --force
    assert kvmpod.run(str(busybox_aci), "--exec", "/bin/nope").returncode == 127
    assert cgroups_of(run_dir) == []
    assert kvmpod.run(str(busybox_aci), "--exec", "/bin/sh", "--", "-c", "echo c > /proc/sysrq-trigger; sleep 60").returncode == 125
    assert cgroups_of(run_dir) == []
    proc, state = running(kvmpod, str(busybox_aci), *SLEEP)
    assert cgroups_of(run_dir) != []
    subprocess.run(kvmpod_cmd("stop", state["uuid"], "--force"), env=kvmpod_env, capture_output=True, check=True)
    proc.communicate(timeout=60)
    assert cgroups_of(run_dir) == []


def test_kvmpod_killed_leaves_its_cgroup_to_gc(kvmpod, kvmpod_env, busybox_aci):
    proc, state = running(kvmpod, str(busybox_aci), *SLEEP)
    proc.kill()
    proc.wait()
    run_dir = kvmpod_env["KVMPOD_RUN_DIR"]
    deadline = time.time() + 10
    while any(Path(d, "cgroup.procs").read_text().strip() for d in cgroups_of(run_dir)) and time.time() < deadline:
        time.sleep(0.1)   # QEMU dies with its kvmpod
    assert cgroups_of(run_dir) != []   # kvmpod had no chance to remove it
    gc = subprocess.run(kvmpod_cmd("gc"), env=kvmpod_env, capture_output=True, text=True)
    assert gc.returncode == 0 and f"removed pod {state['uuid']}" in gc.stdout
    assert cgroups_of(run_dir) == []


def test_with_the_switch_off_qemu_stays_in_kvmpods_cgroup(kvmpod, kvmpod_env, busybox_aci, tmp_path):
    config = tmp_path / "kvmpod.toml"
    config.write_text("[security]\ncgroup = false\n")
    kvmpod.env = {**kvmpod_env, "KVMPOD_CONFIG": str(config)}
    proc, state = running(kvmpod, str(busybox_aci), *SLEEP)
    try:
        assert "cgroup" not in state and cgroups_of(kvmpod_env["KVMPOD_RUN_DIR"]) == []
        assert in_cgroup(state["qemu_pid"]) == in_cgroup(state["kvmpod_pid"])
    finally:
        stop(proc)


def test_on_a_v2_host_the_pod_is_in_the_unified_tree(kvmpod, busybox_aci):
    layout = cgroup.host_layout()
    memory = layout.place("memory")
    if memory is None or memory.version != 2:
        v2 = [h.mount for h in layout.hierarchies if h.version == 2]
        has = (v2[0] / "cgroup.controllers").read_text().split() if v2 else []
        pytest.skip(f"this host's cgroup layout is {layout.kind}: " + (
            f"its v2 tree {v2[0]} has no memory controller (it has: {' '.join(has) or 'none'}),"
            if v2 else "it has no v2 tree,") + " so the pods' memory cgroups are v1 (the tests above)")
    proc, state = running(kvmpod, str(busybox_aci), *SLEEP)
    try:
        where = state["cgroup"]["controllers"]["memory"]
        assert where["version"] == 2
        d = Path(where["path"])
        assert in_cgroup(state["qemu_pid"])[""] == "/" + state["cgroup"]["name"]
        assert (d / "memory.max").read_text().strip() == str(state["cgroup"]["limits"]["memory_bytes"])
        assert not (d / "memory.swap.max").exists() or (d / "memory.swap.max").read_text().strip() == "0"
        assert (d / "memory.oom.group").read_text().strip() == "1"
    finally:
        stop(proc)
