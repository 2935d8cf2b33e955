"""Fault injection for tests: $KVMPOD_TEST_FAULT makes kvmpod fail on purpose at one phase of `kvmpod run`.

    KVMPOD_TEST_FAULT=PHASE:ACTION[,PHASE:ACTION...]

PHASE (where the call sites are: docs/reliability.md lists them):
    import          an image's tar is decompressed into the store's tmp/, not yet checked
    import-commit   its blob is renamed into blobs/, its record not yet written
    disk            a rootfs disk is written to its temporary file, not yet renamed into rootfs/
    snapshot        a boot snapshot's VM answered and prepared, its state not yet saved
    spawn           QEMU has just been spawned (from a snapshot or cold)
    handshake       the agent session exists, the handshake not yet sent
    app-start       the first app has been started in the guest, the pod not yet `running`
    relay           just before the exec into kvmpod-relay
    teardown        the pod's teardown begins (its VM still runs)
ACTION:
    kill-self       SIGKILL kvmpod itself (a crash: nothing of it runs any more)
    kill-qemu       SIGKILL the VM's QEMU and carry on (a crashed or OOM-killed VM)
    stop-qemu       SIGSTOP the VM's QEMU and carry on (a guest that stops answering)
    stop-self       SIGSTOP kvmpod itself (a test then races other commands against it, and SIGCONTs it)

Each firing prints `kvmpod: notice: test fault: ACTION at PHASE` to stderr first, so a test can tell
that it fired. The variable is read once, when this module is imported; unset, at() costs one global
lookup. For tests only, like KVMPOD_TEST_QMP and KVMPOD_CGROUP_MEMORY_MAX (docs/reliability.md).
"""

from __future__ import annotations

import os
import signal
import sys

from kvmpod.errors import ConfigError

ENV = "KVMPOD_TEST_FAULT"
PHASES = ("import", "import-commit", "disk", "snapshot", "spawn", "handshake", "app-start", "relay", "teardown")
ACTIONS = ("kill-self", "kill-qemu", "stop-qemu", "stop-self")
_QEMU_ACTIONS = {"kill-qemu": signal.SIGKILL, "stop-qemu": signal.SIGSTOP}

_SPEC = os.environ.get(ENV) or None
_plan: dict[str, str] | None = None


def parse(text: str) -> dict[str, str]:
    """PHASE:ACTION pairs, checked: {phase: action}."""
    plan: dict[str, str] = {}
    for item in text.split(","):
        phase, _, action = item.strip().partition(":")
        if phase not in PHASES or action not in ACTIONS:
            raise ConfigError(f"${ENV}: {item.strip()!r} is not PHASE:ACTION (phases: {', '.join(PHASES)}; "
                              f"actions: {', '.join(ACTIONS)})")
        plan[phase] = action
    return plan


def at(phase: str, qemu_pid: int | None = None) -> None:
    """A fault site: does what $KVMPOD_TEST_FAULT says for `phase` (nothing when it is unset)."""
    if _SPEC is None:
        return
    _fire(phase, qemu_pid)


def _fire(phase: str, qemu_pid: int | None) -> None:
    global _plan
    if _plan is None:
        _plan = parse(_SPEC or "")
    action = _plan.get(phase)
    if action is None:
        return
    if action in _QEMU_ACTIONS and qemu_pid is None:
        return   # no VM at this site (a disk built by `kvmpod fetch`...): nothing to act on
    print(f"kvmpod: notice: test fault: {action} at {phase}", file=sys.stderr, flush=True)
    if action == "kill-self":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop-self":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        assert qemu_pid is not None
        try:
            os.kill(qemu_pid, _QEMU_ACTIONS[action])
        except ProcessLookupError:
            pass
