"""The container's life as the OCI runtime CLI drives it: create, start, state, kill, pause, resume,
delete (docs/oci-runtime.md).

`create` forks the container's init: a kvmpod pod process that boots the VM, gets the app ready and
then waits for `start` (RunOptions.hold_apps). `create` itself returns once that process reports the
pod created, after writing its pid to --pid-file — so the pid is a child of whoever ran `create`
(conmon, the containerd shim: both are subreapers and adopt it), lives exactly as long as the app,
and ends with the app's exact status: its exit code, or the app's signal raised on itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kvmpod.errors import EXIT_KVMPOD_FAILURE, EXIT_SIGNAL_BASE, KvmpodError
from kvmpod.fsutil import write_atomically
from kvmpod.net.spec import NetRequest
from kvmpod.oci_runtime import bundle as b
from kvmpod.oci_runtime import runtime_log
from kvmpod.oci_runtime.console import become_terminal, send_console
from kvmpod.oci_runtime.records import Container, ContainerNotFound, ContainerStateError, Records, rfc3339
from kvmpod.pod import client, control, registry
from kvmpod.pod.options import RunOptions
from kvmpod.pod.poddir import PodDir, process_start_time
from kvmpod.pod.spec import AppOverrides, ProcessExtras
from kvmpod.pod.volumes import Mount, Volume

START_WAIT = 120.0   # seconds `start` waits for the app to run (or fail) before it returns anyway
# Signals whose default action ends a process: the pod process re-raises the app's on itself.
TERMINATING = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGILL, signal.SIGABRT,
                         signal.SIGFPE, signal.SIGKILL, signal.SIGSEGV, signal.SIGPIPE, signal.SIGALRM,
                         signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGBUS, signal.SIGTRAP,
                         signal.SIGXCPU, signal.SIGXFSZ, signal.SIGSYS, signal.SIGVTALRM, signal.SIGPROF})


@dataclass
class Globals:
    """The global flags every subcommand gets (runc's)."""
    root: Path
    log: str | None
    log_format: str
    debug: bool
    systemd_cgroup: bool


@dataclass
class CreateRequest:
    container_id: str
    bundle: Path
    pid_file: str | None
    console_socket: str | None


def die_like(code: int) -> None:
    """End this process as the app ended: 128+N for a terminating signal N is that signal raised here,
    so a waiting conmon or shim sees WIFSIGNALED (and reports 128+N); anything else is the exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    signo = code - EXIT_SIGNAL_BASE
    if code > EXIT_SIGNAL_BASE and signo in TERMINATING:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signo])
        if signo != signal.SIGKILL:   # its disposition cannot be changed (nor caught: no need)
            signal.signal(signo, signal.SIG_DFL)
        os.kill(os.getpid(), signo)
        time.sleep(1)   # the signal is delivered before this returns; never reached in practice
    os._exit(code & 0xFF)


# -- the pod a bundle describes ---------------------------------------------------------------

def pod_for(bundle: b.Bundle, container: Container) -> tuple[AppOverrides, RunOptions]:
    """The app and run options of the container's pod."""
    volumes: list[Volume] = []
    mounts: list[Mount] = []
    for i, bind in enumerate(x for x in bundle.binds if not x.is_file):
        volumes.append(Volume(f"oci-bind{i}", "host", str(bind.source), read_only=bind.read_only))
        mounts.append(Mount(f"oci-bind{i}", bind.destination))
    staged = b.stage_files(bundle, container.file("files"))
    for read_only in (False, True):
        chosen = [(bind, name) for bind, name in staged if bind.read_only == read_only]
        if chosen:
            name = "oci-files-ro" if read_only else "oci-files"
            volumes.append(Volume(name, "host", str(container.file("files")), read_only=read_only))
            mounts += [Mount(name, bind.destination, file=file) for bind, file in chosen]
    for i, tmpfs in enumerate(bundle.tmpfs):
        volumes.append(Volume(f"oci-tmpfs{i}", "empty", mode=tmpfs.mode))
        mounts.append(Mount(f"oci-tmpfs{i}", tmpfs.destination))
    app = AppOverrides(
        image=f"oci:{container.id}", name=b.APP_NAME, app=b.app_of(bundle), rootfs_dir=bundle.rootfs,
        image_manifest=b.image_manifest(bundle, container.id), readonly_rootfs=bundle.readonly_rootfs,
        mounts=mounts, extras=ProcessExtras(rlimits=bundle.rlimits, oom_score_adj=bundle.oom_score_adj,
                                            keep_etc=True, seccomp_skip_unknown=True, exec_path_lookup=True))
    network = NetRequest(mode="netns", netns=bundle.netns, dns=("none",)) if bundle.netns else NetRequest(dns=("none",))
    options = RunOptions(memory_mib=bundle.memory_mib, cpus=bundle.cpus, hostname=bundle.hostname or None,
                         annotations={}, interactive=True, hold_apps=True, volumes=volumes, network=network,
                         output_fds=(1, 2))
    return app, options


# -- create -----------------------------------------------------------------------------------

def create(records: Records, req: CreateRequest, globals_: Globals, log: TextIO) -> int:
    bundle = b.read_bundle(req.bundle)   # every field checked before anything exists
    if bundle.terminal and not req.console_socket:
        raise b.BundleError("config.json: process.terminal is true: --console-socket is needed")
    now = time.time()
    container = records.new(req.container_id, {
        "id": req.container_id, "bundle": str(req.bundle.absolute()), "rootfs": str(bundle.rootfs),
        "annotations": bundle.annotations, "created": now, "created_rfc3339": rfc3339(now), "pid": 0})
    try:
        app, options = pod_for(bundle, container)
        # the pod process's messages: --log, else a file of the container's (never the app's stderr)
        pod_log = log if globals_.log else runtime_log.open_log(str(container.file("kvmpod.log")), "text")
        pid, report = _fork_pod(app, options, bundle, req, globals_, pod_log)
        container.record.update(pid=pid, pid_start=process_start_time(pid), pod_uuid=report["uuid"],
                                pod_dir=report["pod_dir"], creating=False)
        container.save()
        if req.pid_file:
            write_atomically(Path(req.pid_file), str(pid).encode())
        return 0
    except BaseException:
        records.remove(container)
        raise


def _fork_pod(app: AppOverrides, options: RunOptions, bundle: b.Bundle, req: CreateRequest, globals_: Globals,
              log: TextIO) -> tuple[int, dict[str, Any]]:
    """The container's init, forked; returns its pid and its report once the pod is created."""
    sys.stdout.flush()
    sys.stderr.flush()
    slave = send_console(req.console_socket) if bundle.terminal and req.console_socket else None
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _pod_process(app, options, slave, wfd, log, globals_.debug)
    os.close(wfd)
    if slave is not None:
        os.close(slave)
    report = read_report(rfd)
    if isinstance(report.get("uuid"), str):
        return pid, report
    _, status = os.waitpid(pid, 0)   # it has cleaned up after itself: the error is what it said
    raise KvmpodError(str(report.get("error") or f"the container's pod process ended during create "
                                                  f"(wait status {status})"))


def read_report(fd: int) -> dict[str, Any]:
    """A forked child's one JSON report, read to EOF (the child closed its end, or ended); {} if none."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    try:
        report = json.loads(data) if data else {}
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _pod_process(app: AppOverrides, options: RunOptions, slave: int | None, report_fd: int, log: TextIO,
                 debug: bool) -> None:
    """The forked init: the pod in the foreground, its app's stdio on fds 0-2 (conmon's pipes, or the
    terminal), kvmpod's own messages in the runtime log. Never returns."""
    import asyncio  # the pod process only: the other commands start without it

    from kvmpod.pod.run import run_pod  # asyncio and the agent session: as above

    code = EXIT_KVMPOD_FAILURE
    reported = False

    def send(message: dict[str, Any]) -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        try:
            os.write(report_fd, json.dumps(message).encode())
        except OSError:
            pass   # create was interrupted: the pod goes on, its owner's commands find it
        os.close(report_fd)

    def created(pod: PodDir) -> None:
        send({"uuid": pod.uuid, "pod_dir": str(pod.path)})

    try:
        if slave is not None:
            become_terminal(slave)
        else:
            os.setsid()   # away from the caller's session and its terminal signals
        sys.stderr = log   # notices and errors: the runtime log, never the app's stderr
        code = asyncio.run(run_pod([app], dataclasses.replace(options, on_created=created, debug=debug)))
        send({"error": "the pod ended before it was created", "exit_code": code})
    except KvmpodError as e:
        code = e.exit_code
        print(f"kvmpod-oci: error: {e}", file=log, flush=True)
        if reported:   # after create: the container's own stderr says why it ended too
            os.write(2, f"kvmpod-oci: error: {e}\n".encode(errors="replace"))
        send({"error": str(e), "exit_code": e.exit_code})
    except BaseException as e:   # a bug: one line, as the CLI says it
        print(f"kvmpod-oci: internal error: {type(e).__name__}: {e}", file=log, flush=True)
        send({"error": f"internal error: {type(e).__name__}: {e}", "exit_code": EXIT_KVMPOD_FAILURE})
    finally:
        with_log_flushed(log)
        die_like(code)


def with_log_flushed(log: TextIO) -> None:
    try:
        log.flush()
    except (OSError, ValueError):
        pass


# -- the rest of the life cycle ----------------------------------------------------------------

def _pod_or_fail(container: Container):
    pod = container.pod
    if pod is None or not container.alive:
        raise ContainerStateError(f"container {container.id} is not running")
    return pod


def _request(container: Container, message: dict[str, Any]) -> dict[str, Any]:
    sock = client.connect(_pod_or_fail(container))
    with sock:
        reply, _ = client.request(sock, message, control.FrameParser())
    return reply


def start(records: Records, container_id: str) -> int:
    with records.locked(container_id):
        container = records.get(container_id)
        if container.status != "created":
            raise ContainerStateError(f"container {container_id} is {container.status}, not created: it cannot start")
        _request(container, {"op": "start"})
        deadline = time.monotonic() + START_WAIT
        while container.status == "created" and time.monotonic() < deadline:
            time.sleep(0.01)   # the app's start is reported in state.json within a few ms
    return 0


def state(records: Records, container_id: str) -> int:
    print(json.dumps(records.get(container_id).state(), indent=2))
    return 0


def parse_signal(text: str) -> int:
    """A signal by number or name (KILL, SIGKILL, sigkill)."""
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        found = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if found is not None:
            return int(found)
    raise KvmpodError(f"kill: {text!r} is not a signal")


def kill(records: Records, container_id: str, signo: int) -> int:
    with records.locked(container_id):
        container = records.get(container_id)
        if container.status not in ("created", "running", "paused"):
            raise ContainerStateError(f"container {container_id} is not running")
        _request(container, {"op": "signal", "signal": signo})
    return 0


def set_paused(records: Records, container_id: str, paused: bool) -> int:
    with records.locked(container_id):
        container = records.get(container_id)
        wanted = "running" if paused else "paused"
        if container.status != wanted:
            raise ContainerStateError(f"container {container_id} is {container.status}, not {wanted}")
        _request(container, {"op": "pause" if paused else "resume"})
    return 0


def delete(records: Records, container_id: str, force: bool) -> int:
    """The container goes: a stopped one is cleaned up; a created one is killed first; a running or
    paused one only with --force. A pod whose process died without cleaning up is collected."""
    try:
        records.get(container_id)
    except ContainerNotFound:
        if force:
            return 0   # runc: delete --force of a container that is not there succeeds
        raise
    with records.locked(container_id):
        container = records.get(container_id)
        status = container.status
        if status in ("running", "paused") and not force:
            raise ContainerStateError(f"container {container_id} is {status}: stop it first or use --force")
        pod = container.pod
        if pod is not None and status != "stopped":
            client.stop(pod, timeout=0, force=True)
        pod = container.pod
        if pod is not None and not container.alive:   # its process died without tearing the pod down
            registry.remove(pod)
        records.remove(container)
    return 0
