"""A pod's lifecycle as one explicit state machine: the states state.json records, and the only
transitions between them the runtime may make (docs/layout.md, state.json; docs/architecture.md).

    preparing ──► booting ──► running ──► exited
        │            │ ▲          │
        │            ▼ │(OCI)     │
        │         created ────────┤
        └────────────┴────────────┴──► failed

`preparing` is written when the pod directory is made (poddir.py), `booting` once QEMU runs (again
when a boot snapshot fails to restore and the pod boots cold), `created` only for OCI create (the
apps wait for `start`), `running` once every app runs, `exited` with the apps' statuses, `failed`
when the pod ends any other way. A transition the table does not allow is a bug and raises
StateError, so a new path through the runner cannot silently record a state that means something
else to `kvmpod list`, kvmpod-oci's `state` or rkt's stage0.
"""

from __future__ import annotations

import enum
import functools
from typing import Any, Callable, Concatenate, Coroutine, ParamSpec, Protocol, TypeVar

from kvmpod.errors import KvmpodError
from kvmpod.pod.poddir import PodDir


class PodState(enum.Enum):
    PREPARING = "preparing"
    BOOTING = "booting"
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"


TRANSITIONS: dict[PodState, frozenset[PodState]] = {
    PodState.PREPARING: frozenset({PodState.BOOTING, PodState.FAILED}),
    # booting → booting: the boot snapshot did not restore, the same pod boots cold with a new QEMU
    PodState.BOOTING: frozenset({PodState.BOOTING, PodState.CREATED, PodState.RUNNING, PodState.FAILED}),
    PodState.CREATED: frozenset({PodState.RUNNING, PodState.FAILED}),
    PodState.RUNNING: frozenset({PodState.EXITED, PodState.FAILED}),
    PodState.EXITED: frozenset(),
    PodState.FAILED: frozenset(),
}
ENDED = frozenset({PodState.EXITED, PodState.FAILED})


class StateError(KvmpodError):
    """A transition the lifecycle does not allow: a bug in the runtime, reported as one."""


class Lifecycle:
    """The state of one pod, kept in step with its state.json."""

    def __init__(self, pod: PodDir):
        self.pod = pod
        self.state = PodState(pod.state.get("state", PodState.PREPARING.value))
        # a pod whose apps have run stays "started" when it fails afterwards: its detached logs stay
        self.apps_started = self.state in (PodState.RUNNING, PodState.EXITED)

    def advance(self, to: PodState, **record: Any) -> None:
        """Move to `to`, writing it (and `record`) to state.json."""
        if to not in TRANSITIONS[self.state]:
            raise StateError(f"pod {self.pod.uuid}: no transition from {self.state.value} to {to.value}")
        self.state = to
        self.apps_started = self.apps_started or to is PodState.RUNNING
        self.pod.update(state=to.value, **record)

    def end(self) -> PodState:
        """The pod is over: `failed` unless its apps' exit was recorded."""
        if self.state not in ENDED:
            self.advance(PodState.FAILED)
        return self.state

    def require(self, states: frozenset[PodState] | set[PodState], doing: str) -> None:
        if self.state not in states:
            raise StateError(f"pod {self.pod.uuid} is {self.state.value}: cannot {doing}")


class HasLifecycle(Protocol):
    lifecycle: Lifecycle


S = TypeVar("S", bound=HasLifecycle)
P = ParamSpec("P")
T = TypeVar("T")


def require(*states: PodState, doing: str) -> Callable[[Callable[Concatenate[S, P], Coroutine[Any, Any, T]]],
                                                       Callable[Concatenate[S, P], Coroutine[Any, Any, T]]]:
    """Guard a coroutine method of an object with a `lifecycle`, as qemu.qmp's @require guards its
    protocol's methods by Runstate: called in any other state it raises StateError at once."""
    allowed = frozenset(states)

    def decorate(method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]]
                 ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
        @functools.wraps(method)
        async def guarded(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
            self.lifecycle.require(allowed, doing)
            return await method(self, *args, **kwargs)
        return guarded
    return decorate
