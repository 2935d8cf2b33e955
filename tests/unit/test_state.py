"""The pod lifecycle (kvmpod/pod/state.py): the transitions state.json may record, and the guard."""

from __future__ import annotations

import asyncio
import json

import pytest

from kvmpod.pod.poddir import PodDir
from kvmpod.pod.state import ENDED, TRANSITIONS, Lifecycle, PodState, StateError, require


def pod(tmp_path, state: str = "preparing") -> PodDir:
    (tmp_path / "state.json").write_text(json.dumps({"uuid": "u", "state": state}))
    return PodDir("u", tmp_path, {"uuid": "u", "state": state})


def test_every_state_has_its_transitions_and_the_ended_ones_none():
    assert set(TRANSITIONS) == set(PodState)
    assert all(not TRANSITIONS[s] for s in ENDED)
    assert all(PodState.FAILED in TRANSITIONS[s] for s in set(PodState) - ENDED)


def test_the_oci_path_and_the_plain_path(tmp_path):
    for path in ([PodState.BOOTING, PodState.CREATED, PodState.RUNNING, PodState.EXITED],
                 [PodState.BOOTING, PodState.BOOTING, PodState.RUNNING, PodState.EXITED]):
        life = Lifecycle(pod(tmp_path))
        for state in path:
            life.advance(state)
        assert life.apps_started
        assert json.loads((tmp_path / "state.json").read_text())["state"] == "exited"


def test_a_transition_the_table_does_not_allow_is_refused_and_not_recorded(tmp_path):
    life = Lifecycle(pod(tmp_path))
    with pytest.raises(StateError, match="no transition from preparing to running"):
        life.advance(PodState.RUNNING)
    assert life.state is PodState.PREPARING
    assert json.loads((tmp_path / "state.json").read_text())["state"] == "preparing"
    life.advance(PodState.FAILED)
    with pytest.raises(StateError):
        life.advance(PodState.BOOTING)


def test_end_fails_a_pod_whose_exit_was_not_recorded_and_keeps_apps_started(tmp_path):
    life = Lifecycle(pod(tmp_path, "running"))  # a runner rebuilt after the idle relay starts here
    assert life.apps_started
    assert life.end() is PodState.FAILED and life.apps_started
    exited = Lifecycle(pod(tmp_path, "running"))
    exited.advance(PodState.EXITED)
    assert exited.end() is PodState.EXITED


def test_require_guards_a_coroutine_method_by_state(tmp_path):
    class Runner:
        def __init__(self, life: Lifecycle):
            self.lifecycle = life

        @require(PodState.RUNNING, doing="start a process in it")
        async def start(self) -> str:
            return "started"

    runner = Runner(Lifecycle(pod(tmp_path, "booting")))
    with pytest.raises(StateError, match="pod u is booting: cannot start a process in it"):
        asyncio.run(runner.start())
    runner.lifecycle.advance(PodState.RUNNING)
    assert asyncio.run(runner.start()) == "started"
