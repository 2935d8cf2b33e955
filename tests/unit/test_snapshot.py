"""Boot snapshots without a VM: the QEMU options, the shape key, what rules a snapshot out, the
THAW/PREPARE exchange against a fake guest, eviction. The restore itself is in tests/e2e/test_snapshot.py."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from kvmpod.agent import protocol as p
from kvmpod.boot import snapshot
from kvmpod.errors import ConfigError, VMError
from kvmpod.vm.config import Disk, FsDevice, NinePShare, Nic, VMConfig, qemu_argv
from kvmpod.vm.transport import SERIAL, choose_transport
from tests.unit.test_protocol import _pair, run

T, F = p.MessageType, p.Field


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    made = {}
    for name in ("qemu", "vmlinux", "initrd", "disk.iso"):
        (tmp_path / name).write_bytes(name.encode())
        made[name] = tmp_path / name
    return made


def vm_config(files, **changes) -> VMConfig:
    base = VMConfig(name="kvmpod-x", kernel=files["vmlinux"], initrd=files["initrd"], cmdline="quiet",
                    console_log=Path("/run/x/console.log"), qmp_fd=3,
                    agent_fd=4, machine="microvm", disks=[Disk(files["disk.iso"], "img0")])
    return dataclasses.replace(base, **changes)


def test_the_snapshot_vm_writes_its_memory_through_and_a_restored_one_maps_it_private(files, tmp_path):
    argv = qemu_argv(vm_config(files, memory_file=tmp_path / "memory", memory_file_shared=True))
    assert f"memory-backend-file,id=mem,size=256M,mem-path={tmp_path / 'memory'},share=on" in argv
    assert "microvm,memory-backend=mem" in argv and "-incoming" not in argv
    restored = snapshot.BootSnapshot(tmp_path).restore_config(vm_config(files))
    argv = qemu_argv(dataclasses.replace(restored, restore_monitor_fd=5))
    assert f"memory-backend-file,id=mem,size=256M,mem-path={tmp_path / 'memory'},share=off" in argv
    assert argv[argv.index("-incoming") + 1] == "defer"
    assert "socket,id=restore,fd=5" in argv and "chardev=restore,mode=control" in argv


def test_vhost_user_devices_and_a_snapshot_exclude_each_other(files, tmp_path):
    with pytest.raises(ValueError):
        qemu_argv(vm_config(files, memory_file=tmp_path / "m", filesystems=[FsDevice("t", tmp_path / "s")]))


def test_the_shape_key_follows_everything_the_saved_state_depends_on(files):
    key = snapshot.SnapshotShape.of(vm_config(files), files["qemu"]).key
    # per-pod paths do not matter: they are not in the saved state
    assert snapshot.SnapshotShape.of(vm_config(files, name="other", console_log=Path("/c"),
                                               qmp_fd=9, restore_monitor_fd=10), files["qemu"]).key == key
    for change in ({"memory_mib": 512}, {"cpus": 2}, {"cmdline": "quiet debug"}, {"accel": "kvm"},
                   {"disks": [Disk(files["disk.iso"], "img1")]}, {"machine": "q35"}):
        assert snapshot.SnapshotShape.of(vm_config(files, **change), files["qemu"]).key != key, change
    os.utime(files["vmlinux"], ns=(1, 1))  # a rebuilt kernel: another snapshot
    assert snapshot.SnapshotShape.of(vm_config(files), files["qemu"]).key != key


def test_what_rules_a_snapshot_out(files, tmp_path):
    assert snapshot.unfit(vm_config(files)) is None
    assert "vsock-user" in snapshot.unfit(vm_config(files, agent_transport="vsock-user"))
    assert "virtio-fs" in snapshot.unfit(vm_config(files, filesystems=[FsDevice("t", tmp_path / "s")]))
    assert snapshot.unfit(vm_config(files, nics=[Nic("52:54:00:00:00:01", user_options=())])) is None  # test_snapshot_net
    # 9p volumes do not: QEMU blocks migration only once the guest mounts one, which the snapshot VM never does
    assert snapshot.unfit(vm_config(files, shares_9p=[NinePShare("kvmpodvol0", tmp_path, read_only=True)])) is None


def test_a_9p_shape_has_the_devices_tags_and_not_what_each_pod_exports(files, tmp_path):
    def key(*shares: NinePShare) -> str:
        return snapshot.SnapshotShape.of(vm_config(files, shares_9p=list(shares)), files["qemu"]).key

    one = key(NinePShare("kvmpodvol0", tmp_path / "a"))
    # the directory, read-only flag and security model are the fsdev's: every pod gives its own at restore
    assert key(NinePShare("kvmpodvol0", tmp_path / "b", read_only=True, security_model="none")) == one
    assert one != key() and one != key(NinePShare("kvmpodvol0", tmp_path), NinePShare("kvmpodvol1", tmp_path))
    assert key(NinePShare("other", tmp_path / "a")) != one   # the guest read the tag when it probed the device


def test_auto_transport_is_serial_for_a_snapshot_boot():
    class Kernel:
        image = Path("vmlinux")

        def option(self, name):
            return "y"

    chosen = choose_transport("auto", Kernel(), snapshot=True)  # type: ignore[arg-type]
    assert chosen.kind == SERIAL and "snapshot" in chosen.reason
    assert choose_transport("vsock-user", Kernel(), snapshot=True).kind == "vsock-user"  # type: ignore[arg-type]


def test_boot_setting_from_the_config(tmp_path, monkeypatch):
    conf = tmp_path / "kvmpod.toml"
    monkeypatch.setenv("KVMPOD_CONFIG", str(conf))
    conf.write_text("")
    assert snapshot.boot_setting() == "snapshot"
    conf.write_text('[run]\nboot = "cold"\n')
    assert snapshot.boot_setting() == "cold"
    conf.write_text('[run]\nboot = "warm"\n')
    with pytest.raises(ConfigError, match=r"\[run\] boot.*'warm'"):
        snapshot.boot_setting()


def test_thaw_carries_hostname_fresh_entropy_and_the_time():
    async def scenario():
        host, guest = await _pair()
        before = time.time_ns()
        await host.thaw("pod-a")
        mtype, stream, thaw = await guest.recv()
        assert (mtype, stream) == (T.THAW, 0)
        assert thaw.hostname == b"pod-a"
        assert len(thaw.entropy) == 8 and len(set(thaw.entropy)) == 8
        assert before <= thaw.realtime_ns <= time.time_ns()
        await host.thaw("pod-b")
        _, _, again = await guest.recv()
        assert set(again.entropy).isdisjoint(thaw.entropy)
        # the agent may log (kvmpod.debug=1) before it says HELLO again
        guest.send(p.frame(p.Log(message=b"thawed")))
        await asyncio.gather(host.handshake(), guest.hello())
        await host.close()
    run(scenario())


def test_prepare_waits_for_prepared():
    async def scenario():
        host, guest = await _pair()
        await asyncio.gather(host.handshake(), guest.hello())
        prepare = asyncio.ensure_future(host.prepare_snapshot(["img0", "img1"]))
        mtype, _, prepare_message = await guest.recv()
        assert mtype is T.PREPARE and prepare_message.disk_serial == [b"img0", b"img1"]
        await asyncio.sleep(0.01)
        assert not prepare.done()
        guest.send(p.frame(p.Prepared()))
        await prepare
        guest.send(p.frame(p.Prepared()))  # twice breaks the protocol
        await asyncio.wait_for(host.failed, 5)
        await host.close()
    run(scenario())


def _fake_snapshot(root: Path, key: str, age: float) -> Path:
    path = root / key
    path.mkdir(parents=True)
    (path / "memory").write_bytes(b"m")
    (path / "state").write_bytes(b"s")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_eviction_keeps_the_most_recently_used_and_skips_those_in_use(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPOD_SNAPSHOT_DIR", str(tmp_path))
    for i in range(4):
        _fake_snapshot(tmp_path, f"k{i}", age=100 * i)   # k0 newest, k3 oldest
    in_use = os.open(tmp_path / "k3.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(in_use, fcntl.LOCK_SH)
    dead_stage = tmp_path / "k9.new-999999999"
    dead_stage.mkdir()
    try:
        assert snapshot.evict(2) == ["k2"]   # k3 is in use: it stays
    finally:
        os.close(in_use)
    assert sorted(e.name for e in tmp_path.iterdir() if e.is_dir()) == ["k0", "k1", "k3"]
    assert snapshot.evict(1, keep_key="k3") == ["k1"]
    assert snapshot.remove_all() == 2


def test_a_discarded_snapshot_is_gone_once_released(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPOD_SNAPSHOT_DIR", str(tmp_path))
    path = _fake_snapshot(tmp_path, "bad", age=0)
    fd = os.open(tmp_path / "bad.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    snapshot.SnapshotUse(snapshot.BootSnapshot(path), fd).discard()
    assert not path.exists()


def test_find_claims_only_a_complete_snapshot_nobody_is_making(files, tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPOD_SNAPSHOT_DIR", str(tmp_path / "snaps"))
    config = vm_config(files)
    assert snapshot.find(config, files["qemu"]) is None            # none yet
    key = snapshot.SnapshotShape.of(config, files["qemu"]).key
    made = tmp_path / "snaps" / key
    made.mkdir(parents=True)
    (made / "memory").write_bytes(b"m")
    assert snapshot.find(config, files["qemu"]) is None            # half made: no state yet
    (made / "state").write_bytes(b"s")
    maker = os.open(tmp_path / "snaps" / f"{key}.lock", os.O_RDWR)
    fcntl.flock(maker, fcntl.LOCK_EX)
    assert snapshot.find(config, files["qemu"]) is None            # being made (or removed): do not wait here
    os.close(maker)
    use = snapshot.find(config, files["qemu"])
    assert use is not None and use.snapshot.path == made
    other = os.open(tmp_path / "snaps" / f"{key}.lock", os.O_RDWR)
    with pytest.raises(BlockingIOError):                           # eviction cannot take it meanwhile
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    use.release()
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(other)


def test_the_restore_commands_are_qmp_lines_naming_the_inherited_fd():
    from kvmpod.vm.spawn import RESTORE_ANSWERS, restore_commands

    lines = [json.loads(line) for line in restore_commands(7).decode().splitlines()]
    assert [c["execute"] for c in lines] == ["qmp_capabilities", "migrate-set-capabilities", "migrate-incoming"]
    assert lines[1]["arguments"]["capabilities"] == [{"capability": "x-ignore-shared", "state": True}]
    assert lines[2]["arguments"] == {"uri": "fd:7"} and len(lines) == RESTORE_ANSWERS


@pytest.mark.parametrize("answers, error", [
    (b'{"QMP": {}}\n{"return": {}}\n{"event": "X"}\n{"return": {}}\n{"return": {}}\n', None),
    (b'{"QMP": {}}\n{"return": {}}\n{"error": {"class": "GenericError", "desc": "bad fd"}}\n',
     "did not take the boot snapshot: bad fd"),
    (b'{"QMP": {}}\n{"return": {}}\n', "closed its restore monitor"),
])
def test_the_restore_monitor_answers_decide(answers, error, tmp_path):
    import socket

    from kvmpod.vm.qemu import QemuVM

    ours, qemu_end = socket.socketpair()
    qemu_end.sendall(answers)
    qemu_end.close()
    vm = QemuVM(VMConfig(name="t", kernel=Path("/k"), initrd=Path("/i"), cmdline="", console_log=Path("/c")),
                tmp_path / "qemu.log")
    if error is None:
        run(vm._restore_answers(ours))
    else:
        with pytest.raises((VMError, EOFError), match=error):
            run(vm._restore_answers(ours))


def test_a_qemu_that_cannot_be_spawned_leaves_no_fd_behind(files, tmp_path):
    from kvmpod.vm.spawn import spawn_qemu

    state = tmp_path / "state"
    state.write_bytes(b"")
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(VMError, match="qemu-system-x86_64: not found"):
        spawn_qemu(dataclasses.replace(vm_config(files), incoming=True), tmp_path / "qemu.log", restore_from=state,
                   binary=tmp_path / "empty" / "qemu-system-x86_64")
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_gc_sweeps_what_killed_makers_left_and_never_a_live_makers(tmp_path, monkeypatch):
    """A maker SIGKILLed mid-way left its stage (the guest's RAM) and its work directory for good: `kvmpod gc`
    calls sweep_makers (tests/e2e/test_faults.py kills a real one)."""
    snaps, run_dir = tmp_path / "snaps", tmp_path / "run"
    monkeypatch.setenv("KVMPOD_SNAPSHOT_DIR", str(snaps))
    monkeypatch.setenv("KVMPOD_RUN_DIR", str(run_dir))
    dead, live = 999999999, os.getpid()
    made = [snaps / f"k1.new-{dead}", snaps / f"k2.new-{live}", run_dir / f"snapshot-{dead}-abc",
            run_dir / f"snapshot-{live}-def", run_dir / "snapshot-old", snaps / "k3"]
    for d in made:
        d.mkdir(parents=True)
        (d / "memory").write_bytes(b"x")
    assert sorted(snapshot.sweep_makers()) == sorted([str(snaps / f"k1.new-{dead}"), str(run_dir / f"snapshot-{dead}-abc")])
    assert [d.name for d in made if d.exists()] == [f"k2.new-{live}", f"snapshot-{live}-def", "snapshot-old", "k3"]


def test_qemu_gets_one_malloc_arena_unless_the_caller_chose(monkeypatch):
    from kvmpod.vm.spawn import qemu_env
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert qemu_env()["MALLOC_ARENA_MAX"] == "1"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert qemu_env()["MALLOC_ARENA_MAX"] == "4"
