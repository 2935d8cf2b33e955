"""`kvmpod run`: prepare images and boot assets, boot the VM, run the apps, relay their I/O, tear down.

Teardown is unconditional: whatever happens (app exit, guest death, Ctrl-C, a bug), QEMU is gone
and the pod directory is removed (unless --keep) before run_pod returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, TypeVar

from kvmpod.agent.session import AgentSession, ExitStatus, GuestProcess, ProcessSpec
from kvmpod.errors import EXIT_SIGNAL_BASE, AgentError, AppStartError, Interrupted, KvmpodError, VMError
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.spec import AppOverrides, ResolvedApp, isolator_notices, pod_manifest, resolve_app
from kvmpod.store import Store, StoredImage
from kvmpod.store.locks import SharedLocks
from kvmpod.vm.backend import VMBackend, VMExit

log = logging.getLogger(__name__)
T = TypeVar("T")

SHUTDOWN_GRACE = 10.0   # seconds the guest gets to power off after SHUTDOWN
STDIN_CHUNK = 65536


@dataclass
class RunOptions:
    memory_mib: int = 256
    cpus: int = 1
    kernel: str | None = None
    accel: str = "auto"
    debug: bool = False
    interactive: bool = False
    keep: bool = False
    boot_timeout: float = 60.0
    pod_env: dict[str, str] = field(default_factory=dict)
    kernel_args: list[str] = field(default_factory=list)


def notice(message: str) -> None:
    print(f"kvmpod: notice: {message}", file=sys.stderr, flush=True)


class GuestDied(VMError):
    """The VM ended while kvmpod still expected something of it."""


class FdSink:
    """Writes app output to one of kvmpod's own fds, byte-exact; a closed reader silences it."""

    def __init__(self, fd: int):
        self.fd = fd
        self.broken = False

    def __call__(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self.fd, view):]
            except BrokenPipeError:
                self.broken = True


def run(apps: list[AppOverrides], options: RunOptions) -> int:
    return asyncio.run(run_pod(apps, options))


def prepare_apps(store: Store, apps: list[AppOverrides], pod_env: dict[str, str],
                 claims: SharedLocks) -> list[ResolvedApp]:
    """Find or import every image, claim it against `image rm`, and build (or reuse) its rootfs disk."""
    from kvmpod.image.manifest import check_runnable

    serials: dict[str, str] = {}
    resolved = []
    for overrides in apps:
        image = store.resolve(overrides.image)
        try:
            check_runnable(image.manifest)
        except KvmpodError as e:
            raise KvmpodError(f"{overrides.image}: {e}") from None
        with store.claim([image]) as held:
            disk = store.rootfs_disk(image)
            claims.take_over(held)
        serial = serials.setdefault(image.id, f"img{len(serials)}")
        resolved.append(resolve_app(image, keep_docker_entrypoint(image, overrides), pod_env, disk, serial))
    names = [a.name for a in resolved]
    if len(set(names)) != len(names):
        raise KvmpodError(f"two apps are named {sorted(n for n in names if names.count(n) > 1)[0]!r}: "
                          "give them distinct --name values")
    return resolved


def keep_docker_entrypoint(image: StoredImage, overrides: AppOverrides) -> AppOverrides:
    """`-- ARGS` replace a converted Docker image's CMD but keep its ENTRYPOINT, as with docker run
    (the converter records the ENTRYPOINT in the appc.io/docker/entrypoint annotation, as docker2aci
    does). An explicit --exec means the user takes over the command line: then the appc rule applies."""
    if overrides.args is None or overrides.exec is not None:
        return overrides
    try:
        entrypoint = json.loads(image.manifest.annotations.get("appc.io/docker/entrypoint", "null"))
    except ValueError:
        return overrides
    if not isinstance(entrypoint, list) or not entrypoint or not all(isinstance(w, str) for w in entrypoint):
        return overrides
    # app.exec[0] is ENTRYPOINT[0] already resolved in the image's PATH by the converter
    return dataclasses.replace(overrides, args=[*entrypoint[1:], *overrides.args])


async def run_pod(apps: list[AppOverrides], options: RunOptions) -> int:
    timings = {"start": time.time()}
    with SharedLocks() as claims:  # the pod's images stay in the store until the pod is gone
        return await _run_claimed(apps, options, timings, claims)


async def _run_claimed(apps: list[AppOverrides], options: RunOptions, timings: dict[str, float],
                       claims: SharedLocks) -> int:
    from kvmpod.boot.initrd import build_initrd, find_agent
    from kvmpod.boot.kernel import find_kernel
    from kvmpod.vm.accel import choose_accelerator
    from kvmpod.vm.config import Disk, VMConfig
    from kvmpod.vm.machine import plan_boot
    from kvmpod.vm.qemu import QemuVM, check_socket_path

    resolved = prepare_apps(Store(), apps, options.pod_env, claims)
    for line in isolator_notices(resolved):  # spec/ace.md: ignored isolators must be made known
        notice(line)
    kernel = find_kernel(options.kernel)
    initrd = build_initrd(find_agent(), kernel)
    accel = choose_accelerator(options.accel)
    if accel.name == "tcg" and accel.automatic:
        notice(f"using TCG software emulation (slow): {accel.reason}")
    plan = plan_boot(kernel, options.cpus, options.debug, accel.name, options.kernel_args)
    disks = list({app.disk_serial: Disk(app.disk, app.disk_serial) for app in resolved}.values())

    pod = PodDir.create()
    try:
        pod.write_json("pod-manifest", pod_manifest(resolved))
        config = VMConfig(
            name=f"kvmpod-{pod.uuid}", kernel=kernel.image, initrd=initrd, cmdline=plan.cmdline,
            console_log=pod.file("console.log"), qmp_socket=pod.file("qmp.sock"),
            agent_socket=pod.file("agent.sock"), machine=plan.machine,
            machine_options=plan.machine_options, firmware=plan.firmware, accel=accel.name,
            memory_mib=options.memory_mib, cpus=options.cpus, disks=disks)
        for sock in (config.qmp_socket, config.agent_socket):
            check_socket_path(sock)
        log.debug("pod %s: kernel %s (%s), machine %s, accel %s (%s)", pod.uuid, kernel.image, kernel.kind,
                  plan.machine_arg, accel.name, accel.reason)
        log.debug("kernel cmdline: %s", plan.cmdline)
        vm = QemuVM(config, pod.file("qemu.log"), connect_timeout=options.boot_timeout)
        timings["qemu_spawn"] = time.time()
        runner = PodRunner(pod, vm, resolved, options, timings)
        return await runner.run()
    except KvmpodError as e:
        if options.keep:
            raise KvmpodError(f"{e} (pod directory kept: {pod.path})") from None
        raise
    finally:
        if not options.keep:
            pod.remove()


class PodRunner:
    """One pod's life from QEMU start to power-off."""

    def __init__(self, pod: PodDir, vm: VMBackend, apps: list[ResolvedApp], options: RunOptions,
                 timings: dict[str, float]):
        self.pod = pod
        self.vm = vm
        self.apps = apps
        self.options = options
        self.timings = timings
        self.session: AgentSession | None = None
        self.processes: list[GuestProcess] = []
        self.signals_seen = 0
        self.killed_by_user: int | None = None

    async def run(self) -> int:
        try:
            return await self._run()
        except GuestDied as e:
            if self.killed_by_user is not None:
                raise Interrupted(f"pod killed after a second signal {self.killed_by_user}",
                                  EXIT_SIGNAL_BASE + self.killed_by_user) from None
            raise VMError(self._explain_death(e.args[0])) from None
        finally:
            await self._teardown()

    async def _run(self) -> int:
        channel = await self.vm.start()
        self.pod.update(state="booting", qemu_pid=self.vm.pid)
        self.session = AgentSession(*channel, on_log=lambda line: log.debug("agent: %s", line))
        hello = await self._until(self.session.handshake(), self.options.boot_timeout,
                                  "the guest agent did not answer")
        self.timings["agent_ready"] = time.time()
        log.debug("agent %s speaks protocol %d (guest boot to agent: %.3f s guest clock)",
                  hello.agent_version, hello.version, hello.boot_ns / 1e9)
        self._install_signal_handlers()
        stdout, stderr = FdSink(sys.stdout.fileno()), FdSink(sys.stderr.fileno())
        for i, app in enumerate(self.apps):
            spec = ProcessSpec(app.name, app.disk_serial, app.argv, app.env, app.working_dir, app.user,
                               app.group, app.supplementary_gids, stdin=self.options.interactive and i == 0,
                               readonly_rootfs=app.readonly_rootfs,
                               pre_start=app.event_handlers.get("pre-start", []),
                               post_stop=app.event_handlers.get("post-stop", []), isolators=app.isolators)
            self.processes.append(await self._until(self.session.start(spec, stdout, stderr)))
        self.timings["apps_started"] = time.time()
        self.pod.update(state="running", apps=[{"name": a.name, "image": a.image.id} for a in self.apps])
        stdin_task = None
        if self.options.interactive:
            stdin_task = asyncio.get_running_loop().create_task(self._pump_stdin(self.processes[0]))
        try:
            statuses: list[ExitStatus] = [await self._until(p.wait()) for p in self.processes]
        finally:
            if stdin_task:
                stdin_task.cancel()
        self.timings["apps_exited"] = time.time()
        self.pod.update(state="exited", apps=[{"name": a.name, "image": a.image.id, "exit": s.describe(),
                                               "exit_code": s.shell_code} for a, s in zip(self.apps, statuses)])
        for app, status in zip(self.apps, statuses):
            log.debug("app %s %s", app.name, status.describe())
        failing = [s.shell_code for s in statuses if s.shell_code]
        return failing[0] if failing else 0

    async def _until(self, aw: Awaitable[T], timeout: float | None = None, what: str = "") -> T:
        """Await `aw` unless the VM dies, the agent session fails, or `timeout` passes first."""
        task = asyncio.ensure_future(aw)
        waits: set[asyncio.Future] = {task, self.vm.ended}
        if self.session:
            waits.add(self.session.failed)
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done and not self._failed_with_session(task):
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
        from kvmpod.vm.console import explain

        detail = explain(self.pod.file("console.log"))
        what = detail or vm_exit.describe()
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
        for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signo, self._on_signal, signo)

    def _on_signal(self, signo: int) -> None:
        """First SIGINT/SIGTERM/SIGHUP: forward it to the apps. Second: kill the VM."""
        self.signals_seen += 1
        loop = asyncio.get_running_loop()
        if self.signals_seen == 1:
            for proc in self.processes:
                loop.create_task(proc.signal(signo))
        else:
            self.killed_by_user = signo
            loop.create_task(self.vm.stop(grace=0))

    async def _teardown(self) -> None:
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signo)
        if self.vm.pid is None:
            return  # QEMU never started: nothing to stop
        try:
            if self.session and not self.vm.ended.done():
                await self.session.shutdown()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.vm.ended), SHUTDOWN_GRACE)
            if not self.vm.ended.done():
                await self.vm.stop(grace=2.0)
        finally:
            if self.options.debug:
                from kvmpod.vm.console import tail
                for line in tail(self.pod.file("console.log")):
                    log.debug("console: %s", line)
            if self.session:
                await self.session.close()
            self.timings["vm_ended"] = time.time()
            self.pod.update(state="exited" if self.pod.state.get("state") == "exited" else "failed",
                            timings=self.timings)


