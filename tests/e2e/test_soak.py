"""The soak, shortened (the long one is section `11. soak` of `make bench`, bench/soak.py): 30 mixed pods one
after the other, then a wave of 4 at once, in a store and runtime dir of their own. Every exit code right,
nothing that accumulates, nothing left after `kvmpod gc`. Asserts counts, never timings."""

from __future__ import annotations

from bench.soak import KINDS, kvmpod, leftovers, soak
from tests.e2e.test_faults import base, kvmpod_env  # noqa: F401 - the private dirs, per test

SEQUENTIAL = 30
WAVE = 4


def test_a_short_soak_leaks_nothing(kvmpod_env, busybox_aci, base):  # noqa: F811
    result = soak(kvmpod_env, busybox_aci, base / "work", SEQUENTIAL, waves=1, wave_size=WAVE, sample_every=5)
    assert result.pods == SEQUENTIAL + WAVE
    assert [f"{o.kind} #{o.index}: {o.detail}" for o in result.wrong] == []
    samples = result.samples
    assert len(samples) == SEQUENTIAL // 5 + 2
    # between pods nothing of theirs runs, and the runtime dir and the store are as the first pod left them
    assert {s["our_procs"] for s in samples} == {0}
    assert len({s["run_entries"] for s in samples}) == 1, [s["run_entries"] for s in samples]
    assert len({s["store_bytes"] for s in samples}) == 1, [s["store_bytes"] for s in samples]
    # the detached pods' kvmpod processes, each sampled before its stop, hold no more as the soak goes on
    detached = [s for s in samples if "detached_fds" in s]
    assert len(detached) >= SEQUENTIAL // len(KINDS) // 2
    assert detached[-1]["detached_fds"] <= detached[0]["detached_fds"] + 1
    assert detached[-1]["detached_threads"] <= detached[0]["detached_threads"]
    assert kvmpod(kvmpod_env, "gc").returncode == 0
    assert leftovers(kvmpod_env, base) == []
