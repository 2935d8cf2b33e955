"""Start slots (kvmpod/pod/admission.py): at most N pods of a user start at once; a slot is free again once
its holder releases it, exits or execs."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from kvmpod.errors import ConfigError
from kvmpod.pod import admission


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPOD_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("KVMPOD_CONFIG", str(tmp_path / "kvmpod.toml"))
    return tmp_path


def test_past_n_starts_the_next_waits_until_a_slot_is_released(runtime_dir):
    first, second = admission.take(2), admission.take(2)
    assert {first.index, second.index} == {0, 1}
    got: list[admission.StartSlot] = []
    waiter = threading.Thread(target=lambda: got.append(admission.take(2)), daemon=True)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not got   # both held: it waits (it cannot have finished)
    first.release()
    second.release()
    waiter.join(30)
    assert not waiter.is_alive() and got[0].held and got[0].waited > 0
    got[0].release()
    first.release()   # idempotent
    assert not first.held
    slots = runtime_dir / "run" / "start-slots"
    assert (slots.stat().st_mode & 0o777, (slots / "0").stat().st_mode & 0o777) == (0o700, 0o600)


def holding_child() -> int:
    """A child process that holds the only slot (count 1) until it is killed; its pid."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        admission.take(1)
        os.write(write, b"x")
        signal.pause()
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"x"
    os.close(read)
    return pid


def test_a_dead_holder_leaves_no_slot_taken():
    pid = holding_child()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    slot = admission.take(1)   # would wait forever if the dead child's flock outlived it
    assert slot.held and slot.waited == 0.0
    slot.release()


def test_slots_are_not_inherited_across_exec():
    slot = admission.take(1)
    try:
        assert slot._fd is not None and os.get_inheritable(slot._fd) is False   # O_CLOEXEC: kvmpod-relay drops it
    finally:
        slot.release()


def test_the_count_comes_from_the_config_and_is_checked(runtime_dir):
    (runtime_dir / "kvmpod.toml").write_text("[run]\nconcurrent-starts = 3\n")
    assert admission.slot_count() == 3
    (runtime_dir / "kvmpod.toml").write_text("[run]\nconcurrent-starts = 0\n")
    with pytest.raises(ConfigError, match="concurrent-starts"):
        admission.slot_count()
    (runtime_dir / "kvmpod.toml").unlink()
    assert admission.slot_count() == max(2, 2 * (os.cpu_count() or 1))


@pytest.mark.parametrize("released", [0, 1, 2])
def test_a_waiter_takes_whichever_slot_is_released_first(released, monkeypatch):
    held = {}
    while len(held) < 3:
        slot = admission.take(3)
        held[slot.index] = slot
    # the waiter's tries start at another slot than the one released: it may not wait on that one alone
    monkeypatch.setattr(admission.random, "randrange", lambda n: (released + 1) % n)
    got: list[admission.StartSlot] = []
    waiter = threading.Thread(target=lambda: got.append(admission.take(3)), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got
    held.pop(released).release()
    waiter.join(30)
    try:
        assert not waiter.is_alive() and got[0].index == released
    finally:
        for slot in [*held.values(), *got]:
            slot.release()


def test_waiters_queue_and_each_release_lets_one_through():
    held = [admission.take(2), admission.take(2)]
    got: list[admission.StartSlot] = []
    waiters = [threading.Thread(target=lambda: got.append(admission.take(2)), daemon=True) for _ in range(3)]
    for w in waiters:
        w.start()
    for _ in range(3):
        threading.Event().wait(0.2)
        before = len(got)
        (held.pop() if held else got[0]).release()
        for _ in range(300):
            if len(got) > before:
                break
            threading.Event().wait(0.1)
        assert len(got) == before + 1, "a release let no waiter, or more than one, through"
    for w in waiters:
        w.join(30)
    assert all(not w.is_alive() for w in waiters)
    for slot in [*held, *got]:
        slot.release()


def test_a_dead_holder_wakes_a_waiter():
    pid = holding_child()
    got: list[admission.StartSlot] = []
    waiter = threading.Thread(target=lambda: got.append(admission.take(1)), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    os.kill(pid, signal.SIGKILL)   # the kernel closes its slot: IN_CLOSE_WRITE
    os.waitpid(pid, 0)
    waiter.join(30)
    assert not waiter.is_alive() and got[0].held and got[0].waited > 0
    got[0].release()
