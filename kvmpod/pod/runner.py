"""One pod's life from QEMU start to power-off: the PodRunner (run.py builds it, and rebuilds it after
the idle relay).

The runner owns the pod's lifecycle (state.py), answers the control socket (control.py, through the
ControlTarget interface), decides when the pod is quiet enough for the idle relay and writes the
hand-over record (relay.py, through the Relayable interface; handover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from kvmpod import faults
from kvmpod.agent.session import AgentSession, ExitStatus, GuestProcess, Hello, OutputSink, ProcessSpec
from kvmpod.boot.snapshot import device_macs
from kvmpod.config import bool_setting
from kvmpod.errors import EXIT_SIGNAL_BASE, AgentError, AppStartError, Interrupted, KvmpodError, RunTimeout, VMError
from kvmpod.net.attach import PodNetwork
from kvmpod.pod import audit
from kvmpod.pod.control import ControlServer
from kvmpod.pod.handover import AppProcess, RelayState
from kvmpod.pod.launch import SnapshotClaim
from kvmpod.pod.metadata import PodMetadata
from kvmpod.pod.options import POD_SIGNALS, RunOptions, notice
from kvmpod.pod.output import FdSink, LogSink, OutputPump
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.relay import QUIET_FOR, hand_off
from kvmpod.pod.spec import ResolvedApp
from kvmpod.pod.state import Lifecycle, PodState, require
from kvmpod.pod.terminal import RawTerminal, is_terminal, window_size
from kvmpod.pod.volumes import PodVolumes
from kvmpod.vm.backend import VMBackend, VMExit
from kvmpod.vm.console import explain, tail
from kvmpod.vm.qemu import QemuHandover
from kvmpod.vm.virtiofsd import Virtiofsd

log = logging.getLogger(__name__)
T = TypeVar("T")

SHUTDOWN_GRACE = 10.0   # seconds the guest gets to power off after SHUTDOWN
KILL_WAIT = 5.0         # seconds the agent gets to report the apps' ends after SIGKILL before power-off
STDIN_CHUNK = 65536
OUTPUT_DRAIN_STOPPED = 5.0   # seconds a stopped or killed pod's last output gets to reach a stalled reader


class GuestDied(VMError):
    """The VM ended while kvmpod still expected something of it."""


class PodRunner:
    """One pod's life from QEMU start to power-off."""

    def __init__(self, pod: PodDir, vm: VMBackend, apps: list[ResolvedApp], options: RunOptions,
                 timings: dict[str, float], metadata: PodMetadata | None = None,
                 fs_daemons: list[Virtiofsd] | None = None, volumes: PodVolumes | None = None,
                 network: "PodNetwork | None" = None, restore: SnapshotClaim | None = None,
                 cold_vm: Callable[[], VMBackend] | None = None, hostname: str = "",
                 claim_fds: tuple[int, ...] = (), relay: Path | None = None,
                 side_task: asyncio.Task | None = None):
        self.pod = pod
        self.lifecycle = Lifecycle(pod)
        self.relay = relay   # kvmpod-relay, to hand the pod to once it is quiet (kvmpod/pod/relay.py)
        self.claim_fds = claim_fds   # the store locks: kept open across an exec into kvmpod-relay
        self.side_task = side_task   # work of this process's own that an exec would kill (a boot snapshot's making)
        self.restore = restore    # `vm` starts from this boot snapshot; cold_vm() is the fallback
        self.cold_vm = cold_vm
        self.hostname = hostname
        self.network = network
        self.fs_daemons = fs_daemons or []   # virtiofsd per host volume (kvmpod/vm/virtiofs.py)
        self.volumes = volumes or PodVolumes()
        self.metadata = metadata
        self.vm = vm
        self.apps = apps
        self.options = options
        self.timings = timings
        self.session: AgentSession | None = None
        self.processes: list[GuestProcess] = []
        self.signals_seen = 0
        self.killed_by_user: int | None = None
        self.control: ControlServer | None = None
        self.stop_task: asyncio.Task | None = None
        self.stop_reason: tuple[str, int] | None = None   # why kvmpod ended the VM itself, and the exit status
        self.log_sinks: list[LogSink] = []
        self.sinks: dict[str, tuple[FdSink, FdSink]] = {}   # per app: where its stdout and stderr go
        self.broken_output: set[int] = set()   # output fds kvmpod-relay found broken
        self.handovers = 0   # times this pod went to kvmpod-relay and came back
        self.start_requested = asyncio.Event()   # the `start` control request (RunOptions.hold_apps)
        self.first_failure: int | None = None    # RunOptions.stop_on_failure: the app that failed first
        self._handing_over = False   # the session's channel is out for a hand-over (take_back_channels)
        self.pump = OutputPump(self._hold_output)   # app output to kvmpod's pipes and terminals
        self.timed_out = False   # --timeout ran out (RunOptions.timeout): the pod is being stopped
        self._timeout: asyncio.TimerHandle | None = None

    async def run(self, resumed_by: int | None = None) -> int:
        """The pod's life; `resumed_by` when the runner was rebuilt after kvmpod-relay (relay.py): 0,
        or the signal the relay took."""
        try:
            return await (self._run() if resumed_by is None else self._continue(resumed_by))
        except VMError as e:  # GuestDied, or QEMU killed while it was starting
            if self.killed_by_user is not None:
                raise Interrupted(f"pod killed after a second signal {self.killed_by_user}",
                                  EXIT_SIGNAL_BASE + self.killed_by_user) from e
            if self.stop_reason is not None and self.apps_started:
                return self._record_exit(self._statuses_after_kill())  # `stop --force`, or SIGKILL went unanswered
            if self.stop_reason is not None:
                raise Interrupted(f"pod {self.stop_reason[0]}", self.stop_reason[1]) from e
            if isinstance(e, GuestDied):
                raise VMError(self._explain_death(e.args[0])) from e
            raise
        finally:
            await self._teardown()

    async def _run(self) -> int:
        self.control = ControlServer(self.pod.file("control.sock"), self)
        await self.control.start()
        self.sinks = sinks = self._sinks()
        for daemon in self.fs_daemons:  # QEMU connects to their sockets: they come first
            await daemon.start()
            self.pod.update(virtiofsd_pids=[d.pid for d in self.fs_daemons if d.pid])
        hello = await self._boot()
        session = self.session
        assert session is not None, "a booted pod has its agent session"
        self.timings["agent_ready"] = time.time()
        log.debug("agent %s speaks protocol %d (guest boot to agent: %.3f s guest clock)",
                  hello.agent_version, hello.version, hello.boot_ns / 1e9)
        # interfaces, DNS, hosts entries; a restored VM's NICs have the snapshot's MACs: the agent sets the pod's
        macs = device_macs(len(self.network.guest.interfaces)) if self.network and self.restore else None
        if self.network and (frame := self.network.guest.frame(macs)):
            await self._until(session.send(frame))
        if self.metadata:  # served by the agent from before the first app starts (docs/metadata.md)
            for frame in self.metadata.frames():
                await self._until(session.send(frame))
        self._install_signal_handlers()
        if self.options.hold_apps:  # OCI create: ready, and the apps wait for `start`
            self.lifecycle.advance(PodState.CREATED)
            if self.options.on_created:
                self.options.on_created(self.pod)
            await self._until(self.start_requested.wait())
        tty = self._local_tty()
        for i, app in enumerate(self.apps):
            spec = ProcessSpec(app.name, app.disk_serial, app.argv, app.env, app.working_dir, app.user,
                               app.group, app.supplementary_gids, stdin=self.options.interactive and i == 0,
                               readonly_rootfs=app.readonly_rootfs,
                               pre_start=app.event_handlers.get("pre-start", []),
                               post_stop=app.event_handlers.get("post-stop", []), isolators=app.isolators,
                               tty=tty if i == 0 else None,
                               volume_mounts=[m.field(self.volumes.tag(m.volume), self.volumes.transport)
                                              for m in app.mounts],
                               root_tag=app.disk_serial if app.root_share else "",
                               keep_etc=app.extras.keep_etc, rlimits=app.extras.rlimits,
                               oom_score_adj=app.extras.oom_score_adj, exec_path=app.extras.exec_path_lookup)
            self.processes.append(await self._until(session.start(spec, *sinks[app.name])))
            if i == 0:
                faults.at("app-start", self.vm.pid)
        self.timings["apps_started"] = time.time()
        if self.options.timeout is not None:   # counted from here: the boot has --boot-timeout
            self._timeout = asyncio.get_running_loop().call_later(self.options.timeout, self._timed_out)
        self.lifecycle.advance(PodState.RUNNING, apps=[{"name": a.name, "image": a.image.id} for a in self.apps])
        if self.options.on_started:
            self.options.on_started(self.pod)
        stdin_task = None
        if self.options.interactive:
            stdin_task = asyncio.get_running_loop().create_task(self._pump_stdin(self.processes[0]))
        try:
            with self._terminal(self.processes[0] if tty else None):
                statuses = await self._wait_apps()
        finally:
            if stdin_task:
                stdin_task.cancel()
        return self._record_exit(statuses)

    async def _continue(self, signo: int) -> int:
        """The rest of _run() for a runner rebuilt after kvmpod-relay: the signals it blocked are
        handled again (one it took is handled first), then the apps are waited for as before."""
        self.pod.update(host_process="kvmpod")
        self._install_signal_handlers()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, POD_SIGNALS)
        if signo:
            self._on_signal(signo)
        return self._record_exit(await self._wait_apps())

    async def _wait_apps(self) -> list[ExitStatus]:
        """Every app's exit status. A pod that stays quiet meanwhile is handed to kvmpod-relay
        (kvmpod/pod/relay.py): this process is replaced then, and a new one carries on."""
        async def statuses() -> list[ExitStatus]:
            return [await self._until(p.wait()) for p in self.processes]

        if self.options.stop_on_failure:
            for index, proc in enumerate(self.processes):
                proc.exited.add_done_callback(functools.partial(self._app_ended, index))
        waiting = asyncio.ensure_future(statuses())
        released = False   # the setting is read at the first quiet moment: short pods never pay for it
        while not waiting.done() and (self.relay is not None or not released):
            await asyncio.wait({waiting}, timeout=QUIET_FOR)
            if waiting.done() or not self.quiet():
                continue
            if not released:
                released = True
                if bool_setting("release-translations", "run", True):
                    await self._release_translations()
            if self.relay is None or waiting.done():   # the apps may have ended during the release
                continue
            if self.quiet() and not await self._hand_off(self.relay):
                self.relay = None
        return await waiting

    async def _release_translations(self) -> None:
        """Under TCG, what QEMU translated while the pod started (~12 MiB for a busybox app here) is
        dead weight once the pod is quiet: QEMU drops it and gives the pages back, once per quiet
        spell of this process (after a way back from kvmpod-relay, again). Code the pod runs later is
        translated again (docs/qemu.md)."""
        if await self.vm.release_translations():
            log.debug("the pod is quiet: QEMU dropped its translations")

    async def _hand_off(self, relay: Path) -> bool:
        """hand_off() with the pod's signals blocked first. A signal the kernel delivered just before
        the block has only reached asyncio's self-pipe, and would be lost with it at the exec: a few
        turns of the loop run its handler (_on_signal), after which the pod is no longer quiet. One
        that comes after the block stays pending across the exec, for kvmpod-relay."""
        signal.pthread_sigmask(signal.SIG_BLOCK, POD_SIGNALS)
        try:
            for _ in range(3):   # the self-pipe's reader, then the handler it schedules
                await asyncio.sleep(0)
            return not self.quiet() or hand_off(self, relay)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, POD_SIGNALS)   # only reached when there was no exec

    def _timed_out(self) -> None:
        """--timeout: the apps are stopped as `kvmpod stop` would (SIGTERM, SIGKILL after the stop
        timeout, power-off), and `kvmpod run` ends with RunTimeout (_record_exit)."""
        self.timed_out = True
        log.debug("the apps ran longer than --timeout %g s: stopping the pod", self.options.timeout)
        if self.stop_task is None and self.stop_reason is None:
            self.stop_task = asyncio.get_running_loop().create_task(
                self._stop_apps(signal.SIGTERM, self.options.stop_timeout))

    def _app_ended(self, index: int, fut: asyncio.Future) -> None:
        """RunOptions.stop_on_failure: the first app to fail stops the pod, as a signal would."""
        if fut.cancelled() or fut.exception() is not None or not fut.result().shell_code:
            return
        if self.first_failure is None:
            self.first_failure = index
            if self.stop_task is None and self.stop_reason is None:
                log.debug("app %s failed: stopping the pod", self.apps[index].name)
                self.stop_task = asyncio.get_running_loop().create_task(
                    self._stop_apps(signal.SIGTERM, self.options.stop_timeout))

    # -- the idle relay (relay.py): the quiet test and the hand-over record ---------------------

    def quiet(self) -> bool:
        """Nothing under way that lives in this process only: the pod may go to kvmpod-relay."""
        session = self.session
        return (session is not None and self.lifecycle.state is PodState.RUNNING and self.stop_task is None
                and self.stop_reason is None and self.signals_seen == 0 and self.killed_by_user is None
                and session.open_streams <= {p.stream for p in self.processes} and self.pump.idle
                and (self.side_task is None or self.side_task.done())
                and time.monotonic() - session.quiet_since >= QUIET_FOR)

    def hand_over_channels(self) -> tuple[QemuHandover, int, int, bytes] | None:
        assert self.session is not None and self.control is not None
        hand_over = getattr(self.vm, "hand_over", None)
        if hand_over is None:  # a backend whose VM cannot be adopted after an exec: never
            self.relay = None
            return None
        qemu = hand_over()
        control_fd = self.control.hand_over()
        if qemu is None or control_fd is None:
            return None
        channel = self.session.hand_over()
        if channel is None:
            return None
        self._handing_over = True
        agent_fd, unread = channel
        return qemu, control_fd, agent_fd, unread

    def take_back_channels(self) -> None:
        if self._handing_over and self.session is not None:
            self._handing_over = False
            self.session.take_back()

    def relay_record(self, qemu: QemuHandover, agent_fd: int, control_fd: int) -> RelayState:
        session = self.session
        assert session is not None
        next_stream, finished = session.streams
        processes, broken = [], set(self.broken_output)
        for proc, app in zip(self.processes, self.apps):
            out, err = self.sinks[app.name]
            processes.append(AppProcess(proc.stream, proc.pid or 0,
                                        proc.exited.result() if proc.exited.done() else None,
                                        out.fd, err.fd, out in self.log_sinks))
            broken |= {s.fd for s in (out, err) if s.broken}
        return RelayState(self.pod, self.apps, dataclasses.replace(self.options, on_started=None), self.timings,
                          self.hostname, self.volumes, self.network, qemu, session.hello.result(), next_stream,
                          finished, processes, agent_fd, control_fd, self.claim_fds, broken, self.handovers + 1)

    def agent_log(self, line: str) -> None:
        log.debug("agent: %s", line)

    def _hold_output(self, hold: bool) -> None:
        """OutputPump: stop (or go on) reading the agent channel while a slow reader has much to catch up."""
        session = self.session
        if session is None or session.failed.done() or self._handing_over:
            return
        with contextlib.suppress(Exception):   # a channel closing meanwhile: nothing to hold
            transport = session._transport()
            transport.pause_reading() if hold else transport.resume_reading()

    async def _boot(self) -> Hello:
        """Start QEMU and shake hands with the agent. A VM restored from a boot snapshot gets THAW first;
        one that fails to restore costs its snapshot (removed, to be made anew) and the pod boots cold."""
        try:
            hello = await self._start_vm()
            if self.network:
                self.network.close_fds()  # QEMU holds the taps now: they end with it
            return hello
        except (VMError, AgentError) as e:
            vm_exit = self.vm.ended.result() if self.vm.pid is not None and self.vm.ended.done() else None
            # a VM OOM-killed in its cgroup would be again, and one SIGKILLed from outside was: neither
            # is the snapshot's fault, which stays for the next pod (tests/e2e/test_faults.py)
            not_its_fault = vm_exit is not None and (vm_exit.over_limit or vm_exit.returncode == -signal.SIGKILL)
            if self.restore is None or self.cold_vm is None or self.stop_reason is not None or not_its_fault:
                raise
            failed, self.restore = self.restore, None
            failed.use.discard()
            if self.session:
                await self.session.close()
                self.session = None
            if self.vm.pid is not None:
                with contextlib.suppress(KvmpodError):
                    await self.vm.stop(grace=0)
            why = e.args[0].describe() if isinstance(e, GuestDied) else str(e)   # GuestDied carries a VMExit
            notice(f"boot snapshot {failed.snapshot.key} did not restore ({why}): booting cold")
            self.vm = self.cold_vm()   # on the same taps: kvmpod's fds stay open until a VM has booted
            return await self._start_vm()

    async def _start_vm(self) -> Hello:
        try:
            channel = await self.vm.start()
        finally:
            if self.restore:  # QEMU has mapped the snapshot (or failed to): eviction may take it now
                self.restore.use.release()
        if self.network and not self.restore:  # a cold VM's QEMU holds the taps now: they end with it
            self.network.close_fds()
        if self.stop_reason is not None:  # stopped while QEMU was being spawned
            await self.vm.stop(grace=0)
            raise GuestDied(await self.vm.wait())
        self.lifecycle.advance(PodState.BOOTING, qemu_pid=self.vm.pid, boot="snapshot" if self.restore else "cold",
                        **({"snapshot": self.restore.snapshot.key} if self.restore else {}),
                        **getattr(self.vm, "transport_info", {}))
        self.session = AgentSession(*channel, on_log=self.agent_log)
        faults.at("handshake", self.vm.pid)
        if self.restore:
            await self._until(self.session.thaw(self.hostname))
        return await self._until(self.session.handshake(), self.options.boot_timeout,
                                 "the guest agent did not answer")

    def _record_exit(self, statuses: list[ExitStatus]) -> int:
        """state.json's final word on the apps; returns kvmpod run's exit status."""
        self.timings["apps_exited"] = time.time()
        self.lifecycle.advance(PodState.EXITED, apps=[{"name": a.name, "image": a.image.id, "exit": s.describe(),
                                               "exit_code": s.shell_code} for a, s in zip(self.apps, statuses)])
        for app, status in zip(self.apps, statuses):
            log.debug("app %s %s", app.name, status.describe())
        if self.options.on_exited:
            self.options.on_exited([(a.name, s) for a, s in zip(self.apps, statuses)])
        if self.timed_out:
            raise RunTimeout(f"the apps ran longer than --timeout {self.options.timeout:g} s: the pod was stopped "
                             f"({', '.join(f'{a.name} {s.describe()}' for a, s in zip(self.apps, statuses))})")
        if self.first_failure is not None:  # stop_on_failure: the others' ends were its consequence
            return statuses[self.first_failure].shell_code
        failing = [s.shell_code for s in statuses if s.shell_code]
        return failing[0] if failing else 0

    def _statuses_after_kill(self) -> list[ExitStatus]:
        """The apps' statuses once kvmpod has killed the VM: those the agent reported, SIGKILL for the rest."""
        statuses = []
        for proc in self.processes:
            fut = proc.exited
            done = fut.done() and not fut.cancelled() and fut.exception() is None
            statuses.append(fut.result() if done else ExitStatus(signal=signal.SIGKILL))
        return statuses

    # -- what the control socket asks for (kvmpod/pod/control.py) ------------------------------

    @property
    def apps_started(self) -> bool:
        return self.lifecycle.apps_started

    @property
    def accepts_enter(self) -> bool:
        return (self.apps_started and self.stop_task is None and self.stop_reason is None
                and self.session is not None and not self.session.failed.done())

    @require(PodState.RUNNING, doing="start a process in it")
    async def start_process(self, spec: ProcessSpec, on_stdout: OutputSink, on_stderr: OutputSink) -> GuestProcess:
        """Start one more process in the pod (kvmpod enter); raises if the VM or the session ends first."""
        if self.session is None:
            raise AgentError("the pod's agent is not up yet")
        return await self._until(self.session.start(spec, on_stdout, on_stderr))

    def request_start(self) -> None:
        """`start` (OCI): the apps of a pod created with hold_apps may start now."""
        if not self.options.hold_apps:
            raise KvmpodError(f"pod {self.pod.uuid} was not created to wait for a start request")
        if self.start_requested.is_set():
            raise KvmpodError(f"pod {self.pod.uuid} has been started already")
        self.start_requested.set()

    async def signal_apps(self, signo: int) -> None:
        """`signal` (OCI kill): `signo` to every app that runs. Before they run, a pod that is told to
        end (SIGKILL, SIGTERM, SIGINT, SIGHUP) goes at once, as a container that was never started."""
        if self.pod.state.get("paused") and self.vm.pid is not None and not self.vm.ended.done():
            await self.set_paused(False)   # a frozen guest could not act on the signal
        if not self.apps_started:
            if signo in (signal.SIGKILL, *POD_SIGNALS):
                self.stop_reason = self.stop_reason or (f"killed by signal {signo} before its apps started",
                                                        EXIT_SIGNAL_BASE + signo)
                await self._kill_vm()
                return
            raise KvmpodError(f"pod {self.pod.uuid}: its apps have not started, signal {signo} has nowhere to go")
        for proc in self.processes:
            if not proc.exited.done():
                await self._until(proc.signal(signo))

    @require(PodState.BOOTING, PodState.CREATED, PodState.RUNNING, doing="pause or resume it")
    async def set_paused(self, paused: bool) -> None:
        """`pause`/`resume` (OCI): the VM's vCPUs stopped or let go; state.json says which."""
        if self.vm.pid is None or self.vm.ended.done():
            raise KvmpodError(f"pod {self.pod.uuid} has no running VM to {'pause' if paused else 'resume'}")
        await (self.vm.pause() if paused else self.vm.resume())
        self.pod.update(paused=paused)

    def request_stop(self, timeout: float, force: bool) -> None:
        """`kvmpod stop`: SIGTERM to the apps, `timeout` seconds, SIGKILL, power-off. `force`: kill QEMU now."""
        loop = asyncio.get_running_loop()
        if force:
            self.stop_reason = self.stop_reason or ("stopped with --force", EXIT_SIGNAL_BASE + signal.SIGKILL)
            loop.create_task(self._kill_vm())
        elif self.stop_task is None:
            self.stop_task = loop.create_task(self._stop_apps(signal.SIGTERM, timeout))

    async def _kill_vm(self) -> None:
        if self.vm.pid is not None:  # else QEMU is being spawned: _run stops it once it is
            with contextlib.suppress(KvmpodError):
                await self.vm.stop(grace=0)

    async def _stop_apps(self, signo: int, timeout: float) -> None:
        """`signo` to every app, `timeout` seconds, SIGKILL to what still runs, and if the agent does not
        report their ends either, power-off. Before the apps have all started: the VM goes at once."""
        if not self.apps_started:
            self.stop_reason = self.stop_reason or ("stopped before its apps started", EXIT_SIGNAL_BASE + signo)
            await self._kill_vm()
            return
        for sig, wait in ((signo, timeout), (signal.SIGKILL, KILL_WAIT)):
            running = [p for p in self.processes if not p.exited.done()]
            with contextlib.suppress(KvmpodError, ConnectionError):
                for proc in running:
                    await proc.signal(sig)
            if await self._all_exited(wait):
                return
            log.debug("apps still running %.0f s after signal %d", wait, sig)
        self.stop_reason = self.stop_reason or ("killed: the guest did not report the apps' ends",
                                                EXIT_SIGNAL_BASE + signal.SIGKILL)
        await self._kill_vm()

    async def _all_exited(self, timeout: float) -> bool:
        waits = [asyncio.shield(p.exited) for p in self.processes if not p.exited.done()]
        if not waits:
            return True
        every = asyncio.gather(*waits, return_exceptions=True)
        either: set[asyncio.Future[Any]] = {every, self.vm.ended}
        await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not every.done():
            every.cancel()
            with contextlib.suppress(BaseException):
                await every
            return self.vm.ended.done()
        return True

    # -- the local side: output sinks, the terminal -------------------------------------------

    def _sinks(self) -> dict[str, tuple[FdSink, FdSink]]:
        """Where each app's stdout and stderr go: kvmpod's own, or with --detach one log file per app
        (<pod dir>/logs/<app>.log, both streams in arrival order)."""
        if not self.options.detach:
            out_fd, err_fd = self.options.output_fds or (sys.stdout.fileno(), sys.stderr.fileno())
            stdout, stderr = FdSink(out_fd, self.pump), FdSink(err_fd, self.pump)
            return {app.name: (stdout, stderr) for app in self.apps}
        logs = self.pod.file("logs")
        logs.mkdir(mode=0o700, exist_ok=True)
        sinks: dict[str, tuple[FdSink, FdSink]] = {}
        for app in self.apps:
            fd = os.open(logs / f"{app.name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            sink = LogSink(fd)
            self.log_sinks.append(sink)
            sinks[app.name] = (sink, sink)
        return sinks

    def _local_tty(self) -> tuple[int, int] | None:
        """--interactive on a terminal: the app gets a pty of the terminal's size."""
        if not self.options.interactive or not is_terminal(sys.stdin.fileno()):
            return None
        return window_size(sys.stdin.fileno()) or (24, 80)

    @contextlib.contextmanager
    def _terminal(self, proc: GuestProcess | None):
        """Raw mode and window-size changes while the app has the terminal; restored however it ends."""
        if proc is None:
            yield
            return
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()

        def resized() -> None:
            if size := window_size(fd):
                loop.create_task(proc.resize(*size))

        loop.add_signal_handler(signal.SIGWINCH, resized)
        try:
            with RawTerminal(fd):
                yield
        finally:
            loop.remove_signal_handler(signal.SIGWINCH)

    async def _until(self, aw: Awaitable[T], timeout: float | None = None, what: str = "") -> T:
        """Await `aw` unless the VM dies, the agent session fails, or `timeout` passes first."""
        task = asyncio.ensure_future(aw)
        waits: set[asyncio.Future] = {task, self.vm.ended}
        if self.session:
            waits.add(self.session.failed)
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done and not self._failed_with_session(task):
            error = task.exception()
            if type(error) is AgentError:  # the channel closed or broke: usually the VM is going down
                with contextlib.suppress(asyncio.TimeoutError):
                    raise GuestDied(await asyncio.wait_for(asyncio.shield(self.vm.ended), 2.0)) from error
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if self.vm.ended.done():
            raise GuestDied(self.vm.ended.result())
        if self.session and self.session.failed.done():
            # the channel usually closes because the VM is going down: prefer that explanation
            with contextlib.suppress(asyncio.TimeoutError):
                raise GuestDied(await asyncio.wait_for(asyncio.shield(self.vm.ended), 2.0))
            raise self.session.failed.result()
        raise AgentError(f"{what} within {timeout:.0f} s (console log: {self.pod.file('console.log')})")

    def _failed_with_session(self, task: asyncio.Future) -> bool:
        """True when `task` failed only because the whole session did (explained below, not by the task)."""
        error = task.exception()
        return (error is not None and not isinstance(error, AppStartError)
                and self.session is not None and self.session.failed.done())

    def _explain_death(self, vm_exit: VMExit) -> str:
        detail = explain(self.pod.file("console.log"))
        what = vm_exit.failure or detail or vm_exit.describe()
        return f"the VM ended before the app finished: {what}"

    async def _pump_stdin(self, proc: GuestProcess) -> None:
        """Relay kvmpod's stdin to the app. A thread reads it: stdin may be a file, a pipe or a tty."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        fd = sys.stdin.fileno()

        def reader() -> None:
            while True:
                try:
                    data = os.read(fd, STDIN_CHUNK)
                except OSError:
                    data = b""
                try:
                    asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
                except (RuntimeError, asyncio.CancelledError):
                    return  # the loop is gone: the app has finished
                if not data:
                    return

        threading.Thread(target=reader, name="kvmpod-stdin", daemon=True).start()
        with contextlib.suppress(AgentError):
            while data := await queue.get():
                await proc.write_stdin(data)
            await proc.close_stdin()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signo in POD_SIGNALS:
            loop.add_signal_handler(signo, self._on_signal, signo)

    def _on_signal(self, signo: int) -> None:
        """First SIGINT/SIGTERM/SIGHUP: forward it to the apps, SIGKILL after the stop timeout. Second
        (or one during `kvmpod stop`): kill the VM."""
        self.signals_seen += 1
        loop = asyncio.get_running_loop()
        if self.signals_seen == 1 and self.stop_task is None:
            self.stop_task = loop.create_task(self._stop_apps(signo, self.options.stop_timeout))
        else:
            self.killed_by_user = signo
            loop.create_task(self.vm.stop(grace=0))

    async def _teardown(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timeout is not None:
            self._timeout.cancel()
        for signo in POD_SIGNALS:
            loop.remove_signal_handler(signo)
        if self.vm.pid is None:
            await self._stop_fs_daemons()
            await self._close_local()
            return  # QEMU never started: nothing else to stop
        faults.at("teardown", self.vm.pid)
        try:
            # the guest writes through to the host only on host volumes: without them there is nothing
            # to sync or unmount, and QEMU can be told to quit at once
            if self.session and not self.vm.ended.done() and (self.volumes.host or self.fs_daemons):
                await self.session.shutdown()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.vm.ended), SHUTDOWN_GRACE)
            if not self.vm.ended.done():
                await self.vm.stop(grace=2.0)
        finally:
            if self.options.debug:
                for line in tail(self.pod.file("console.log")):
                    log.debug("console: %s", line)
            if self.session:
                await self.session.close()
            await self._stop_fs_daemons()
            self.timings["vm_ended"] = time.time()
            log.debug("timings: %s", describe_timings(self.timings))
            ended = self.lifecycle.end()
            self.pod.update(timings=self.timings)
            audit.pod_ended(self.pod.uuid, ended.value, self.pod.state.get("apps", []))
            await self._close_local()

    async def _stop_fs_daemons(self) -> None:
        """virtiofsd after QEMU: killed and waited for, so none outlives the pod."""
        for daemon in self.fs_daemons:
            with contextlib.suppress(Exception):
                await daemon.stop()

    async def _close_local(self) -> None:
        """The pod is gone: stop the stop task, close the app logs, and last the control socket, whose
        connections' EOF tells `kvmpod stop` and `logs --follow` that the pod has ended."""
        # the apps' last output, to a reader that may be slow; one that reads nothing does not keep a pod
        # that was told to end from ending (its output is dropped then)
        ended_by_us = (self.stop_task is not None or self.stop_reason is not None or self.signals_seen > 0
                       or self.killed_by_user is not None)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.pump.drain(), OUTPUT_DRAIN_STOPPED if ended_by_us else None)
        if self.stop_task:
            self.stop_task.cancel()
        for sink in self.log_sinks:
            with contextlib.suppress(OSError):
                os.close(sink.fd)
        self.log_sinks.clear()
        if self.control:
            await self.control.close()


# the run path's phases, from the timestamps kvmpod run records (state.json's timings)
PHASES = (("start", "qemu_spawn", "planning"), ("qemu_spawn", "agent_ready", "QEMU to agent"),
          ("agent_ready", "apps_started", "apps' start"), ("apps_started", "apps_exited", "apps"),
          ("apps_exited", "vm_ended", "teardown"))


def describe_timings(timings: dict[str, float]) -> str:
    """--debug's line on where a run's time went (the phases it reached), e.g. `planning 0.210 s,
    QEMU to agent 0.480 s, ... total 2.100 s`."""
    parts = [f"{what} {timings[b] - timings[a]:.3f} s" for a, b, what in PHASES if a in timings and b in timings]
    if "start" in timings and "vm_ended" in timings:
        parts.append(f"total {timings['vm_ended'] - timings['start']:.3f} s")
    return ", ".join(parts)
