"""Boot snapshots end to end (docs/snapshot.md): made on first use, restored after, each restored pod
its own (hostname, random generator, clock), a broken snapshot costs one cold boot and is made anew,
concurrent first uses make one snapshot, and what rules a snapshot out boots cold.

Each test asks for its own --memory size, so it gets a snapshot shape no other test made."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import stderr_lines

SH = ["--exec", "/bin/sh", "--", "-c"]


def snapshots(env: dict[str, str]) -> list[Path]:
    root = Path(env["KVMPOD_SNAPSHOT_DIR"])
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def kept_state(kvmpod, *args: str) -> tuple[dict, "object"]:
    """Run with --keep; return state.json and the result, and remove the pod directory."""
    pods = Path(kvmpod.env["KVMPOD_RUN_DIR"], "pods")
    before = set(pods.glob("*")) if pods.exists() else set()
    result = kvmpod.run("--keep", *args)
    (pod,) = set(pods.glob("*")) - before
    state = json.loads((pod / "state.json").read_text())
    shutil.rmtree(pod)
    return state, result


def test_first_run_makes_the_snapshot_and_the_next_restores_it(kvmpod, busybox_aci):
    before = set(snapshots(kvmpod.env))
    state, first = kept_state(kvmpod, "--memory", "200M", str(busybox_aci), *SH, "echo one")
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == b"one\n" and state["boot"] == "cold"   # booted cold, the snapshot made alongside
    (made,) = set(snapshots(kvmpod.env)) - before   # and finished before `kvmpod run` exited
    assert sorted(p.name for p in made.iterdir()) == ["memory", "shape.json", "state"]
    assert json.loads((made / "shape.json").read_text())["memory_mib"] == 200
    state, second = kept_state(kvmpod, "--memory", "200M", str(busybox_aci), *SH, "echo two; cat /proc/meminfo")
    assert second.returncode == 0, second.stderr.decode()
    assert second.stdout.startswith(b"two\n") and b"MemTotal" in second.stdout
    assert (state["boot"], state["snapshot"], state["agent_transport"]) == ("snapshot", made.name, "serial")
    assert stderr_lines(second) == []


def test_each_restored_pod_is_its_own(kvmpod, busybox_aci):
    script = "hostname; cat /proc/sys/kernel/random/boot_id; head -c 32 /dev/urandom | od -An -x; date +%s"
    runs = []
    for extra in ([], [], ["--hostname", "chosen"]):
        result = kvmpod.run("--memory", "208M", *extra, str(busybox_aci), *SH, script)
        assert result.returncode == 0, result.stderr.decode()
        runs.append(result.stdout.decode().split("\n"))
    hostnames = [r[0] for r in runs]
    assert hostnames[0].startswith("kvmpod-") and hostnames[0] != hostnames[1] and hostnames[2] == "chosen"
    assert len({r[1] for r in runs}) == 3, "boot_id repeated across restored pods"
    assert len({r[2] + r[3] for r in runs}) == 3, "the guest random generator repeated across restored pods"
    for r in runs:  # the clock is the host's, not the snapshot's
        assert abs(int(r[-2]) - time.time()) < 30, r


def test_a_broken_snapshot_costs_one_cold_boot_and_is_made_anew(kvmpod, busybox_aci):
    assert kvmpod.run("--memory", "216M", str(busybox_aci), *SH, "true").returncode == 0
    before = set(snapshots(kvmpod.env))
    (made,) = [p for p in before if json.loads((p / "shape.json").read_text())["memory_mib"] == 216]
    (made / "state").write_bytes(b"QEVM broken")
    result = kvmpod.run("--memory", "216M", str(busybox_aci), *SH, "echo still-runs")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"still-runs\n"
    notices = [line for line in result.stderr.decode().splitlines() if "did not restore" in line]
    assert len(notices) == 1 and made.name in notices[0] and notices[0].endswith("booting cold"), result.stderr
    assert not made.exists()
    state, again = kept_state(kvmpod, "--memory", "216M", str(busybox_aci), *SH, "true")  # made anew alongside
    assert again.returncode == 0 and state["boot"] == "cold"
    assert (made / "state").read_bytes() != b"QEVM broken"
    state, used = kept_state(kvmpod, "--memory", "216M", str(busybox_aci), *SH, "true")
    assert used.returncode == 0 and state["boot"] == "snapshot" and state["snapshot"] == made.name


def test_concurrent_first_runs_make_one_snapshot(kvmpod, busybox_aci):
    before = set(snapshots(kvmpod.env))
    procs = [kvmpod.popen("--memory", "224M", str(busybox_aci), *SH, "echo ok") for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1] for o in outs]
    assert [o[0] for o in outs] == [b"ok\n"] * 4
    assert len(set(snapshots(kvmpod.env)) - before) == 1
    assert not list(Path(kvmpod.env["KVMPOD_SNAPSHOT_DIR"]).glob("*.new-*"))


def test_a_first_pod_that_fails_leaves_no_half_made_snapshot(kvmpod, busybox_aci):
    """The snapshot is made alongside the first pod: when that pod fails, the making is finished or given
    up before kvmpod exits, never left half-way (no stage, no work directory, no QEMU)."""
    before = set(snapshots(kvmpod.env))
    result = kvmpod.run("--memory", "240M", str(busybox_aci), "--exec", "/no/such/program")
    assert result.returncode != 0 and b"/no/such/program" in result.stderr, result.stderr
    root = Path(kvmpod.env["KVMPOD_SNAPSHOT_DIR"])
    assert not list(root.glob("*.new-*"))
    assert not list(Path(kvmpod.env["KVMPOD_RUN_DIR"]).glob("snapshot-*"))
    for made in set(snapshots(kvmpod.env)) - before:   # finished, if it was: complete
        assert sorted(p.name for p in made.iterdir()) == ["memory", "shape.json", "state"]
    state, again = kept_state(kvmpod, "--memory", "240M", str(busybox_aci), *SH, "echo fine")
    assert again.returncode == 0 and again.stdout == b"fine\n", again.stderr
    assert len(set(snapshots(kvmpod.env)) - before) == 1


def test_a_quiet_first_pod_goes_to_the_relay_only_once_its_snapshot_making_is_over(kvmpod, busybox_aci):
    """kvmpod-relay replaces the pod's process, whose event loop drives the snapshot being made alongside:
    a quiet first pod is handed over only once that is over. Here the maker's guest is frozen before its
    save (a test fault), so the making lasts until --boot-timeout gives it up; meanwhile the pod stays in
    kvmpod, and afterwards it goes to the relay with nothing of the maker left."""
    from kvmpod.pod.relay import find_relay
    from tests.e2e.test_relay import exe_name

    if find_relay() is None:
        pytest.skip("kvmpod-relay is not built (make -C kvmpod/relay)")
    faulty = type(kvmpod)({**kvmpod.env, "KVMPOD_TEST_FAULT": "snapshot:stop-qemu"})
    root = Path(kvmpod.env["KVMPOD_SNAPSHOT_DIR"])
    pods = Path(kvmpod.env["KVMPOD_RUN_DIR"], "pods")
    old_pods = set(pods.glob("*")) if pods.exists() else set()
    before = set(snapshots(kvmpod.env))
    proc = faulty.popen("--memory", "248M", "--boot-timeout", "10", str(busybox_aci), "--exec", "/bin/sleep",
                        "--", "120")
    try:
        deadline, staged, relayed = time.time() + 120, False, None
        while relayed is None and time.time() < deadline and proc.poll() is None:
            stage = list(root.glob("*.new-*")) if root.exists() else []
            staged = staged or bool(stage)
            for state_file in set(pods.glob("*/state.json")) - {p / "state.json" for p in old_pods}:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    state = json.loads(state_file.read_text())
                    if state.get("host_process") == "kvmpod-relay" and exe_name(state["kvmpod_pid"]) == "kvmpod-relay":
                        relayed = (state, stage)
            time.sleep(0.05)
        assert staged, "the snapshot was never being made"
        assert relayed is not None, "never handed to kvmpod-relay"
        state, stage_then = relayed
        assert state["boot"] == "cold" and stage_then == [], "handed over while the snapshot was being made"
        assert set(snapshots(kvmpod.env)) == before and not list(Path(kvmpod.env["KVMPOD_RUN_DIR"]).glob("snapshot-*"))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert b"no boot snapshot made: making a boot snapshot took longer than 10 s" in err, err


def test_cold_boot_on_request_and_where_a_snapshot_cannot_carry_the_pod(kvmpod, busybox_aci, tmp_path):
    state, result = kept_state(kvmpod, "--boot", "cold", "--memory", "232M", str(busybox_aci), *SH, "true")
    assert result.returncode == 0 and state["boot"] == "cold" and state["agent_transport"] == "vsock-user"
    state, result = kept_state(kvmpod, "--agent-transport", "vsock-user", "--memory", "232M", str(busybox_aci),
                               *SH, "true")
    assert result.returncode == 0 and state["boot"] == "cold"
    share = tmp_path / "share"
    share.mkdir()
    state, result = kept_state(kvmpod, "--memory", "232M", "--volume", f"data,kind=host,source={share}",
                               str(busybox_aci), "--mount", "volume=data,target=/data", *SH, "echo x > /data/f")
    assert result.returncode == 0, result.stderr.decode()
    assert state["boot"] == "cold" and (share / "f").read_text() == "x\n"
    config = tmp_path / "cold.toml"
    config.write_text('[run]\nboot = "cold"\n')
    state, result = kept_state(type(kvmpod)({**kvmpod.env, "KVMPOD_CONFIG": str(config)}),
                               "--memory", "232M", str(busybox_aci), *SH, "true")
    assert result.returncode == 0 and state["boot"] == "cold"
    assert not [p for p in snapshots(kvmpod.env)
                if json.loads((p / "shape.json").read_text())["memory_mib"] == 232]


NINE_P = ('echo "read $(cat /r/f)"; echo "$1" > /h/w; touch /r/x 2>&1 | sed "s/^/ro /"; '
          'grep -E " /h | /r " /proc/self/mountinfo | sed "s/^/mi /"')


def test_9p_host_volumes_start_from_a_snapshot_each_pod_with_its_own_directories(kvmpod, busybox_aci, tmp_path):
    """The snapshot VM has the 9p devices but mounts none (QEMU 7.2 blocks saving only a mounted one); each
    restored pod's QEMU exports that pod's directories on them, read-only where the volume says so."""
    config = tmp_path / "nine.toml"
    config.write_text('[run]\nvolume-transport = "9p"\n')
    by_env = type(kvmpod)({**kvmpod.env, "KVMPOD_VOLUME_TRANSPORT": "9p"})
    by_setting = type(kvmpod)({**kvmpod.env, "KVMPOD_CONFIG": str(config)})   # as root: virtio-fs without it
    before = set(snapshots(kvmpod.env))
    for run in ("one", "two", "three"):   # the first makes the snapshot; the others restore it, each its directories
        nine = by_setting if run == "three" else by_env
        share, frozen = tmp_path / f"share-{run}", tmp_path / f"frozen-{run}"
        share.mkdir()
        frozen.mkdir()
        (frozen / "f").write_text(f"frozen-{run}\n")
        state, result = kept_state(nine, "--memory", "264M", "--volume", f"h,kind=host,source={share}",
                                   "--volume", f"r,kind=host,source={frozen},readOnly=true", str(busybox_aci),
                                   "--mount", "volume=h,target=/h", "--mount", "volume=r,target=/r",
                                   "--exec", "/bin/sh", "--", "-c", NINE_P, "sh", f"wrote-{run}")
        assert result.returncode == 0, result.stderr.decode()
        lines = result.stdout.decode().splitlines()
        assert f"read frozen-{run}" in lines and (share / "w").read_text() == f"wrote-{run}\n"
        assert any(line.startswith("ro ") and "Read-only file system" in line for line in lines)
        assert sorted(os.listdir(frozen)) == ["f"]
        mounts = {m[5]: m for m in (line.split() for line in lines if line.startswith("mi "))}
        assert set(mounts) == {"/h", "/r"} and all(m[m.index("-") + 1] == "9p" for m in mounts.values())
        (made,) = set(snapshots(kvmpod.env)) - before   # made once, for the first pod
        if run != "one":
            assert (state["boot"], state["snapshot"]) == ("snapshot", made.name), state
    assert json.loads((made / "shape.json").read_text())["shares_9p"] == ["kvmpodvol0", "kvmpodvol1"]


def test_old_snapshots_are_evicted(kvmpod, busybox_aci, tmp_path):
    config = tmp_path / "keep.toml"
    config.write_text("[run]\nsnapshots-kept = 1\n")
    env = {**kvmpod.env, "KVMPOD_CONFIG": str(config), "KVMPOD_SNAPSHOT_DIR": str(tmp_path / "snaps")}
    limited = type(kvmpod)(env)
    for memory in ("240M", "248M"):
        assert limited.run("--memory", memory, str(busybox_aci), *SH, "true").returncode == 0
    (left,) = snapshots(env)
    assert json.loads((left / "shape.json").read_text())["memory_mib"] == 248
    assert os.stat(left / "memory").st_blocks * 512 < 248 << 20  # sparse: only what the guest wrote


def test_a_pod_failing_after_its_qemu_was_spawned_from_a_snapshot_leaves_nothing(kvmpod, busybox_aci, tmp_path):
    """QEMU starts from an existing snapshot while kvmpod is still setting the pod up (kvmpod/pod/launch.py);
    a failure after that ends it: one line, no QEMU (the autouse fixture), no pod directory."""
    made = kvmpod.run("--memory", "232M", str(busybox_aci), "--exec", "/bin/true")
    assert made.returncode == 0, made.stderr.decode()
    bad = tmp_path / "missing-dir" / "uuid"
    result = kvmpod.run("--memory", "232M", "--uuid-file-save", str(bad), str(busybox_aci), "--exec", "/bin/true")
    assert result.returncode == 125
    assert stderr_lines(result) == [f"kvmpod: error: --uuid-file-save {bad}: No such file or directory"]
    pods = Path(kvmpod.env["KVMPOD_RUN_DIR"], "pods")
    assert not (pods.exists() and any(pods.iterdir()))


def test_the_spare_app_root_made_with_the_snapshot_goes_to_the_first_writable_app(kvmpod, busybox_aci):
    """PREPARE builds one writable app root per image disk (guest-agent app_prebuild): on a restored VM the
    first writable app on that disk moves it into place; a second app on the disk and a read-only app
    build their own, as on a cold boot. Each app still gets its own root, /etc/hosts and hostname."""
    args = ["--memory", "216M", "--hostname", "spare-test"]
    # makes the snapshot (--debug as below: kvmpod.debug=1 is on the kernel command line, part of the shape)
    assert kvmpod.run("--debug", *args, str(busybox_aci), *SH, "true").returncode == 0
    script = "echo {0} > /mine; cat /mine; ls /; grep -q localhost /etc/hosts && echo hosts-{0}; hostname"
    result = kvmpod.run("--debug", *args,
                        str(busybox_aci), "--name", "one", *SH, script.format("one"), "---",
                        str(busybox_aci), "--name", "two", *SH, "sleep 1; " + script.format("two"), "---",
                        str(busybox_aci), "--name", "ro", "--readonly-rootfs", *SH, "sleep 2; cat /mine || echo none")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode().split()
    for app in ("one", "two"):
        assert out.count(app) == 1 and f"hosts-{app}" in out, out   # own root: each sees only its own /mine
    assert "none" in out and out.count("spare-test") == 2
    spare_lines = [line for line in result.stderr.decode().splitlines() if "spare root of disk" in line]
    assert len(spare_lines) == 1 and "app one:" in spare_lines[0], spare_lines


def test_the_spare_root_holds_the_executors_etc_hosts_and_a_pods_entries_replace_it(kvmpod, busybox_aci):
    """The spare root is made with the executor's /etc/hosts (the image has none): creating it copies /etc
    up into the overlay, the costliest step of a restored START, so the snapshot holds it. A pod without
    hosts entries gets that file as it would have made it; one with entries gets them (replaced)."""
    args = ["--memory", "216M", "--hostname", "hosts-test"]
    assert kvmpod.run("--debug", *args, str(busybox_aci), *SH, "true").returncode == 0   # makes the snapshot

    def restored(*extra: str) -> str:
        result = kvmpod.run("--debug", *args, *extra, str(busybox_aci), *SH, "cat /etc/hosts")
        assert result.returncode == 0, result.stderr.decode()
        assert "spare root of disk" in result.stderr.decode()   # restored, and the spare moved in
        assert "created /etc/hosts" not in result.stderr.decode()   # the START found it made
        return result.stdout.decode()

    assert restored() == "127.0.0.1 localhost\n::1 localhost\n"
    assert restored("--hosts-entry", "192.0.2.7=db.example.org") == (
        "127.0.0.1 localhost\n::1 localhost\n127.0.1.1 hosts-test\n192.0.2.7 db.example.org\n")
