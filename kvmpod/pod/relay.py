"""The idle relay: a quiet pod's kvmpod process execs kvmpod-relay, a small C program, and comes back
when something needs it (docs/relay.md).

While a pod's apps run, its `kvmpod run` process mostly waits, yet as a Python process with asyncio
and QMP loaded it holds ~20 MiB. Once the pod has been quiet for QUIET_FOR seconds (no frame but app
output, nothing sent, no control connection, no stop under way) this module execs
kvmpod/relay/relay.c in its place: same pid, so QEMU stays its child (and dies with it) and
state.json stays true. The relay copies the apps' output; anything else (an app's exit, a control
connection, a signal, a QMP event, QEMU's end) makes it exec kvmpod again, as
`python -m kvmpod.pod.resume`, which rebuilds the pod's runner from the state written here and goes on.

What crosses the two execs: the channels as inherited fds (agent, QMP, the control socket's listener,
the store locks, the app log files), the agent bytes read but not yet dispatched, and the runner's
state as the hand-over record (handover.py): versioned JSON in a memfd, checked when it is read back,
since the code that reads it may have changed while the pod sat in the relay.
SIGINT, SIGTERM and SIGHUP stay blocked across both execs, so none is lost in between.

Not handed over (the pod stays in Python): --interactive pods (stdin, terminal), pods with virtiofsd
(its daemons are this process's children to stop) or kvmpod's own vsock device (it lives in this
process), and a pod while `kvmpod enter`, `stop` or `wait` holds a control connection.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Protocol

from kvmpod import faults, resources
from kvmpod.config import lookup
from kvmpod.errors import ConfigError
from kvmpod.pod.handover import RelayState, encode_record, memfd
from kvmpod.pod.options import POD_SIGNALS, RunOptions
from kvmpod.pod.poddir import PodDir
from kvmpod.vm.qemu import QemuHandover

log = logging.getLogger(__name__)

QUIET_FOR = 1.0   # seconds of quiet before the hand-over: short pods never pay for the way back
ENV_RELAY = "KVMPOD_RELAY"    # a kvmpod-relay binary, or "off"
RESUME = ("-P", "-m", "kvmpod.pod.resume")   # -P: the working directory is not on the module path


def find_relay() -> Path | None:
    """The kvmpod-relay binary: $KVMPOD_RELAY, else the package's own copy, the checkout's build, the system
    copy (kvmpod/resources.py); None when
    the relay is off (KVMPOD_RELAY=off, `[run] idle-relay = false`) or not built."""
    env = os.environ.get(ENV_RELAY)
    if env == "off":
        return None
    if env:
        relay = Path(env).expanduser()
        if not (relay.is_file() and os.access(relay, os.X_OK)):
            raise ConfigError(f"${ENV_RELAY} names {relay}, which is not an executable file")
        return relay
    setting = lookup("idle-relay", "run")
    if setting is not None:
        if not isinstance(setting.value, bool):
            raise ConfigError(f"{setting.describe('idle-relay')} must be true or false")
        if not setting.value:
            return None
    found = resources.find_program("kvmpod-relay")
    if found is None:
        log.debug("no kvmpod-relay binary (%s): the pod stays in this process",
                  resources.missing_program_hint("kvmpod-relay"))
    return found


def unfit(options: RunOptions, virtiofs: bool, agent_transport: str) -> str | None:
    """Why a pod can never be handed over, or None."""
    if options.interactive:
        return "it is interactive"
    if options.timeout is not None:
        return "its --timeout is kept by this process"
    if options.on_exited or options.hold_apps:
        return "it reports to a caller in this process (on_exited, OCI create/start)"
    if virtiofs:
        return "its virtiofsd daemons are this process's to stop"
    if options.backend == "libvirt":
        return "its VM is a libvirt domain, driven over a connection that lives in this process"
    if agent_transport == "vsock-user":
        return "kvmpod's userspace vsock device lives in this process"
    return None


class Relayable(Protocol):
    """What the hand-over needs of a pod's runner (runner.py): its pod, the three channels that can be
    handed over (each says None when it cannot be, right now), and the record of everything else."""
    pod: PodDir

    def hand_over_channels(self) -> tuple[QemuHandover, int, int, bytes] | None:
        """The QEMU, the control listener's fd, the agent channel's fd and its unread bytes; None (and
        nothing changed) if one of them cannot be handed over now."""

    def take_back_channels(self) -> None:
        """The exec did not happen: the channels are this process's again."""

    def relay_record(self, qemu: QemuHandover, agent_fd: int, control_fd: int) -> RelayState:
        """The runner's state as the next kvmpod process rebuilds it."""


def hand_off(runner: Relayable, relay: Path) -> bool:
    """Exec `relay` in place of this process. Returns only if it did not: True to try again later
    (the pod was busy after all), False if this pod cannot be handed over."""
    channels = runner.hand_over_channels()
    if channels is None:
        return True
    qemu, control_fd, agent_fd, unread = channels
    try:
        return _exec(runner, relay, runner.relay_record(qemu, agent_fd, control_fd), unread)
    finally:
        runner.take_back_channels()  # only reached when there was no exec


def _exec(runner: Relayable, relay: Path, state: RelayState, unread: bytes) -> bool:
    qemu, agent_fd, control_fd, processes = state.qemu, state.agent_fd, state.control_fd, state.processes
    try:
        payload = encode_record(state)
    except Exception as e:  # something of this pod cannot cross an exec: it stays here
        log.debug("idle relay: the pod's state cannot be carried over (%s): it stays in this process", e)
        return False
    opened: list[int] = []
    inherited = [agent_fd, qemu.qmp_fd, control_fd, *state.claim_fds,
                 *{fd for p in processes for fd in (p.stdout_fd, p.stderr_fd) if fd > 2}]
    try:
        opened.append(state_fd := memfd("kvmpod-pod-state", payload))
        opened.append(unread_fd := memfd("kvmpod-agent-unread", unread))
        opened.append(pidfd := os.pidfd_open(qemu.pid))
        os.set_inheritable(pidfd, True)
        argv = [str(relay), "--agent", str(agent_fd), "--qmp", str(qemu.qmp_fd), "--control", str(control_fd),
                "--qemu", str(pidfd), "--unread", str(unread_fd)]
        for p in processes:
            if p.status is None:
                argv += ["--stream", f"{p.stream}:{p.stdout_fd}:{p.stderr_fd}"]
        for fd in sorted(state.broken):
            argv += ["--broken", str(fd)]
        # --pod: where the pod is, should even the record's envelope not read (resume.py ends the pod then)
        argv += ["--", sys.executable, *RESUME, "--state", str(state_fd), "--pod", str(runner.pod.path)]
        log.debug("idle relay: handing the pod to %s", relay)
        runner.pod.update(host_process="kvmpod-relay", relay_handovers=state.handovers)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for handler in logging.getLogger().handlers:
            handler.flush()
        for fd in inherited:
            os.set_inheritable(fd, True)
        faults.at("relay", qemu.pid)
        signal.pthread_sigmask(signal.SIG_BLOCK, POD_SIGNALS)
        try:
            os.execv(relay, argv)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, POD_SIGNALS)
    except OSError as e:
        log.debug("idle relay: %s: %s: the pod stays in this process", relay, e.strerror)
        for fd in inherited:
            os.set_inheritable(fd, False)
        for fd in opened:
            os.close(fd)
        runner.pod.update(host_process="kvmpod")
        return False
    raise AssertionError("unreachable: execv returned")
