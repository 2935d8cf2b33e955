"""Pod listing, UUID prefixes and gc on fabricated pod directories (no VM)."""

from __future__ import annotations

import json
import subprocess

import pytest

from kvmpod import cli
from kvmpod.errors import UsageError
from kvmpod.pod import registry
from tests.unit.conftest import sleeper


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def make_pod(run_dir, uuid: str, state: str, kvmpod_pid: int, created: float = 1.0):
    path = run_dir / "pods" / uuid
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"uuid": uuid, "state": state, "kvmpod_pid": kvmpod_pid,
                                                 "created": created, "apps": [{"name": "web"}]}))
    return path


def test_states_as_seen_from_outside(run_dir, owner):
    make_pod(run_dir, "aaaa1111", "running", owner, 1)
    make_pod(run_dir, "bbbb2222", "running", dead_pid(), 2)
    make_pod(run_dir, "cccc3333", "exited", dead_pid(), 3)
    assert [(p.uuid, p.status) for p in registry.list_pods()] == [
        ("aaaa1111", "running"), ("bbbb2222", "abandoned"), ("cccc3333", "exited")]


def test_uuid_prefixes(run_dir):
    make_pod(run_dir, "abc-1", "exited", 0)
    make_pod(run_dir, "abd-2", "exited", 0)
    assert registry.find_pod("abc").uuid == "abc-1"
    with pytest.raises(UsageError, match="ambiguous"):
        registry.find_pod("ab")
    with pytest.raises(UsageError, match="no pod"):
        registry.find_pod("zz")


def test_gc_removes_what_no_kvmpod_owns_and_spares_the_rest(run_dir, owner):
    live = make_pod(run_dir, "live", "running", owner)
    abandoned = make_pod(run_dir, "abandoned", "running", dead_pid())
    exited = make_pod(run_dir, "exited", "exited", dead_pid())
    assert sorted(registry.gc()) == ["abandoned", "exited"]
    assert live.exists() and not abandoned.exists() and not exited.exists()


def test_gc_kills_a_stray_qemu_of_the_pod_only(run_dir):
    stray = sleeper("qemu-system-x86_64 -name kvmpod-stray1,debug-threads=on")
    other = sleeper("sleep")
    try:
        path = make_pod(run_dir, "stray1", "running", dead_pid())
        state = json.loads((path / "state.json").read_text())
        (path / "state.json").write_text(json.dumps({**state, "qemu_pid": stray.pid}))
        assert registry.gc() == ["stray1"]
        assert stray.wait(timeout=5) == -9
        (path.parent / "other").mkdir()
        (path.parent / "other" / "state.json").write_text(json.dumps({"state": "exited", "qemu_pid": other.pid}))
        registry.gc()
        assert other.poll() is None  # not a QEMU of that pod: never killed
    finally:
        for p in (stray, other):
            p.kill()
            p.wait()


def test_gc_grace_period(run_dir):
    make_pod(run_dir, "recent", "exited", dead_pid())
    assert registry.gc(grace_period=3600) == []
    assert registry.gc() == ["recent"]


def test_list_and_status_commands(run_dir, capsys):
    make_pod(run_dir, "1234abcd", "exited", dead_pid())
    assert cli.main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["state"] == "exited"
    assert cli.main(["status", "1234"]) == 0
    assert "state:   exited" in capsys.readouterr().out
    assert cli.main(["status", "nope"]) == 125


def test_the_owner_is_known_by_its_start_time_across_an_exec(tmp_path):
    from kvmpod.pod.poddir import process_start_time

    # a process that execs another program (as kvmpod does into kvmpod-relay): its command line
    # changes, its pid and start time do not
    proc = subprocess.Popen(["sh", "-c", "read line; exec sleep 30"], stdin=subprocess.PIPE)
    try:
        start = process_start_time(proc.pid)
        info = registry.PodInfo("u", tmp_path, {"kvmpod_pid": proc.pid, "kvmpod_start": start})
        assert info.owner_alive
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        while "sleep" not in registry._cmdline(proc.pid):
            pass
        assert info.owner_alive and process_start_time(proc.pid) == start
        # the same pid with another start time is another process
        assert not registry.PodInfo("u", tmp_path, {"kvmpod_pid": proc.pid, "kvmpod_start": start + 1}).owner_alive
    finally:
        proc.kill()
        proc.wait()
    assert not info.owner_alive and process_start_time(proc.pid) is None
