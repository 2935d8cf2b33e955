"""The idle relay: a quiet pod's kvmpod process execs kvmpod-relay, a small C program, and comes back
when something needs it (docs/relay.md).

While a pod's apps run, its `kvmpod run` process mostly waits, yet as a Python process with asyncio
and QMP loaded it holds ~20 MiB. Once the pod has been quiet for QUIET_FOR seconds (no frame but app
output, nothing sent, no control connection, no stop under way) this module execs
guest-agent/host/relay.c in its place: same pid, so QEMU stays its child (and dies with it) and
state.json stays true. The relay copies the apps' output; anything else (an app's exit, a control
connection, a signal, a QMP event, QEMU's end) makes it exec kvmpod again, as
`python -m kvmpod.pod.resume`, which rebuilds the pod's runner from the state written here and goes on.

What crosses the two execs: the channels as inherited fds (agent, QMP, the control socket's listener,
the store locks, the app log files), the agent bytes read but not yet dispatched, and the runner's
state, pickled into a memfd this process writes and only a later image of this same process reads.
SIGINT, SIGTERM and SIGHUP stay blocked across both execs, so none is lost in between.

Not handed over (the pod stays in Python): --interactive pods (stdin, terminal), pods with virtiofsd
(its daemons are this process's children to stop) or kvmpod's own vsock device (it lives in this
process), and a pod while `kvmpod enter`, `stop` or `wait` holds a control connection.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpod import paths, resources
from kvmpod.errors import ConfigError

if TYPE_CHECKING:
    from kvmpod.agent.session import ExitStatus, Hello
    from kvmpod.net.attach import PodNetwork
    from kvmpod.pod.launch import RunOptions
    from kvmpod.pod.poddir import PodDir
    from kvmpod.pod.run import PodRunner
    from kvmpod.pod.spec import ResolvedApp
    from kvmpod.pod.volumes import PodVolumes
    from kvmpod.vm.qemu import QemuHandover

log = logging.getLogger(__name__)

QUIET_FOR = 1.0   # seconds of quiet before the hand-over: short pods never pay for the way back
ENV_RELAY = "KVMPOD_RELAY"    # a kvmpod-relay binary, or "off"
RESUME = ("-P", "-m", "kvmpod.pod.resume")   # -P: the working directory is not on the module path


def find_relay() -> Path | None:
    """The kvmpod-relay binary: $KVMPOD_RELAY, else the package's own copy, the checkout's build, the system
    copy (kvmpod/resources.py); None when
    the relay is off (KVMPOD_RELAY=off, `[run] idle-relay = false`) or not built."""
    from kvmpod.config import lookup

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


def unfit(options: "RunOptions", virtiofs: bool, agent_transport: str) -> str | None:
    """Why a pod can never be handed over, or None."""
    if options.interactive:
        return "it is interactive"
    if options.on_exited or options.hold_apps:
        return "it reports to a caller in this process (on_exited, OCI create/start)"
    if virtiofs:
        return "its virtiofsd daemons are this process's to stop"
    if agent_transport == "vsock-user":
        return "kvmpod's userspace vsock device lives in this process"
    return None


def quiet(runner: "PodRunner") -> bool:
    """Nothing under way that lives in this process only."""
    session = runner.session
    return (session is not None and runner.stop_task is None and runner.stop_reason is None
            and runner.signals_seen == 0 and runner.killed_by_user is None
            and session.open_streams <= {p.stream for p in runner.processes}
            and time.monotonic() - session.quiet_since >= QUIET_FOR)


@dataclass
class AppProcess:
    """One app's process as the next kvmpod process adopts it."""
    stream: int
    pid: int
    status: "ExitStatus | None"   # it has ended already
    stdout_fd: int
    stderr_fd: int
    log: bool                     # --detach: both streams go to the app's log file


@dataclass
class RelayState:
    """The runner as the next kvmpod process rebuilds it (kvmpod/pod/resume.py)."""
    pod: "PodDir"
    apps: list["ResolvedApp"]
    options: "RunOptions"
    timings: dict[str, float]
    hostname: str
    volumes: "PodVolumes"
    network: "PodNetwork | None"
    qemu: "QemuHandover"
    hello: "Hello"
    next_stream: int
    finished: set[int]
    processes: list[AppProcess]
    agent_fd: int
    control_fd: int
    claim_fds: tuple[int, ...]
    broken: set[int] = field(default_factory=set)   # output fds that failed: their output is dropped
    handovers: int = 1


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    try:
        os.set_inheritable(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state(fd: int) -> RelayState:
    with os.fdopen(fd, "rb") as f:
        state = pickle.load(f)  # written by this same process before its exec (a memfd nobody else has)
    if not isinstance(state, RelayState):
        raise TypeError("the relay state is not a RelayState")
    return state


def hand_off(runner: "PodRunner", relay: Path) -> bool:
    """Exec `relay` in place of this process. Returns only if it did not: True to try again later
    (the pod was busy after all), False if this pod cannot be handed over."""
    assert runner.session is not None and runner.control is not None
    if not hasattr(runner.vm, "hand_over"):  # a backend whose VM cannot be adopted after an exec
        return False
    qemu = runner.vm.hand_over()
    control_fd = runner.control.hand_over()
    if qemu is None or control_fd is None:
        return True
    channel = runner.session.hand_over()
    if channel is None:
        return True
    agent_fd, unread = channel
    try:
        return _exec(runner, relay, qemu, control_fd, agent_fd, unread)
    finally:
        runner.session.take_back()  # only reached when there was no exec


def _exec(runner: "PodRunner", relay: Path, qemu: "QemuHandover", control_fd: int, agent_fd: int,
          unread: bytes) -> bool:
    from kvmpod.pod.run import POD_SIGNALS

    session = runner.session
    assert session is not None
    next_stream, finished = session.streams
    processes, broken = [], set(runner.broken_output)
    for proc, app in zip(runner.processes, runner.apps):
        out, err = runner.sinks[app.name]
        processes.append(AppProcess(proc.stream, proc.pid or 0, proc.exited.result() if proc.exited.done() else None,
                                    out.fd, err.fd, out in runner.log_sinks))
        broken |= {s.fd for s in (out, err) if s.broken}
    state = RelayState(runner.pod, runner.apps, dataclasses.replace(runner.options, on_started=None),
                       runner.timings, runner.hostname, runner.volumes, runner.network, qemu, session.hello.result(),
                       next_stream, finished, processes, agent_fd, control_fd, runner.claim_fds, broken,
                       runner.handovers + 1)
    try:
        payload = pickle.dumps(state)
    except Exception as e:  # something of this pod cannot cross an exec: it stays here
        log.debug("idle relay: the pod's state cannot be carried over (%s): it stays in this process", e)
        return False
    opened: list[int] = []
    inherited = [agent_fd, qemu.qmp_fd, control_fd, *runner.claim_fds,
                 *{fd for p in processes for fd in (p.stdout_fd, p.stderr_fd) if fd > 2}]
    try:
        opened.append(state_fd := _memfd("kvmpod-pod-state", payload))
        opened.append(unread_fd := _memfd("kvmpod-agent-unread", unread))
        opened.append(pidfd := os.pidfd_open(qemu.pid))
        os.set_inheritable(pidfd, True)
        argv = [str(relay), "--agent", str(agent_fd), "--qmp", str(qemu.qmp_fd), "--control", str(control_fd),
                "--qemu", str(pidfd), "--unread", str(unread_fd)]
        for p in processes:
            if p.status is None:
                argv += ["--stream", f"{p.stream}:{p.stdout_fd}:{p.stderr_fd}"]
        for fd in sorted(broken):
            argv += ["--broken", str(fd)]
        argv += ["--", sys.executable, *RESUME, "--state", str(state_fd)]
        log.debug("idle relay: handing the pod to %s", relay)
        runner.pod.update(host_process="kvmpod-relay", relay_handovers=state.handovers)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for handler in logging.getLogger().handlers:
            handler.flush()
        for fd in inherited:
            os.set_inheritable(fd, True)
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


async def restore_runner(state: RelayState, unread: bytes, broken: set[int]) -> "PodRunner":
    """The runner of the pod this process held before it exec'd kvmpod-relay, with its VM, agent
    session, apps' processes and control socket adopted."""
    from kvmpod.agent.session import AgentSession
    from kvmpod.pod.control import ControlServer
    from kvmpod.pod.run import FdSink, LogSink, PodRunner
    from kvmpod.vm.qemu import QemuVM

    vm = await QemuVM.adopt(state.qemu, socket.socket(fileno=state.qemu.qmp_fd))
    runner = PodRunner(state.pod, vm, state.apps, state.options, state.timings, volumes=state.volumes,
                       network=state.network, hostname=state.hostname, claim_fds=state.claim_fds)
    runner.handovers = state.handovers
    runner.relay = find_relay()
    runner.broken_output = state.broken | broken
    session = await AgentSession.adopt(socket.socket(fileno=state.agent_fd), unread, state.hello,
                                       state.next_stream, state.finished, runner.agent_log)
    runner.session = session
    sinks: dict[int, FdSink] = {}
    for app, proc in zip(state.apps, state.processes):
        out, err = (sinks.setdefault(fd, (LogSink if proc.log else FdSink)(fd)) for fd in (proc.stdout_fd, proc.stderr_fd))
        for sink in (out, err):
            sink.broken = sink.fd in runner.broken_output
        runner.sinks[app.name] = (out, err)
        runner.processes.append(session.adopt_process(proc.stream, proc.pid, out, err, proc.status))
    runner.log_sinks = [s for s in sinks.values() if isinstance(s, LogSink)]
    session.dispatch()
    runner.control = ControlServer(state.pod.file("control.sock"), runner)
    await runner.control.start(socket.socket(fileno=state.control_fd))
    return runner
