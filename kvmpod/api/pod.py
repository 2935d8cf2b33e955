"""kvmpod.Pod and kvmpod.run(): pods driven from Python, with `kvmpod run`'s options (docs/api.md).

The options are parsed here, in the caller's process, by the same functions `kvmpod run` uses (a bad one
raises its UsageError at once), into the same AppOverrides and RunOptions. The pod then runs in a worker
process (kvmpod/api/worker.py) through the same kvmpod.pod.entry.run() as the CLI: a pod owns signal
handlers, an event loop and its QEMU's lifetime, none of which belong in the caller's process. The
apps' stdin, stdout and stderr are the worker's, so they go wherever the caller says, as with
subprocess: captured (PIPE), a file, or inherited. A failure comes back as the kvmpod.errors class
the CLI would have reported it with.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kvmpod import errors
from kvmpod.cli.types import memory_mib
from kvmpod.errors import AppExitError, KvmpodError, PodTimeout, UsageError
from kvmpod.net.spec import request as net_request
from kvmpod.pod.options import STOP_TIMEOUT, RunOptions
from kvmpod.pod.podmanifest import read_pod_manifest
from kvmpod.pod.spec import AppOverrides
from kvmpod.pod.volumes import parse_mount, parse_volume

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
KILL_GRACE = 30.0    # seconds past the pod's own stop timeout before the worker is SIGKILLed
Stream = int | IO[Any] | None


@dataclass
class App:
    """One app of a pod: `kvmpod run`'s app flags (`IMAGE --exec PATH --user U ... -- ARGS`)."""

    image: str                              # an ACI file or URL, docker-archive:…, oci:…, an image ID or name
    exec: str | None = None                 # --exec
    args: Sequence[str] | None = None       # -- ARGS: replace the image's arguments
    env: Mapping[str, str] = field(default_factory=dict)    # --set-env
    user: str | None = None
    group: str | None = None
    working_dir: str | None = None
    name: str | None = None
    readonly_rootfs: bool = False
    mounts: Sequence[str] = ()              # --mount volume=NAME,target=PATH

    def overrides(self) -> Any:
        return AppOverrides(image=str(self.image), exec=self.exec, args=None if self.args is None else list(self.args),
                            env=dict(self.env), user=self.user, group=self.group, working_dir=self.working_dir,
                            name=self.name, readonly_rootfs=self.readonly_rootfs,
                            mounts=[parse_mount(m) for m in self.mounts])


@dataclass(frozen=True)
class PodResult:
    """How a pod ended: `kvmpod run`'s exit status (the app's; 128+N if killed by signal N; with several
    apps, as docs/cli.md says) and what was captured."""

    exit_code: int
    stdout: bytes | None
    stderr: bytes | None
    messages: str               # kvmpod's own notices (and --debug logging), not the apps' output
    uuid: str | None            # the pod's UUID, once its apps had started


def _memory(value: int | str | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    import argparse


    try:
        return memory_mib(value)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"memory: {e}") from e


class Pod:
    """A pod to run: its apps and `kvmpod run`'s pod flags, checked when the Pod is made.

    Pod(["example.com/busybox", App("build/web.aci", exec="/bin/httpd")], memory="512M", net="user")
    """

    def __init__(self, apps: App | str | Sequence[App | str], *, memory: int | str | None = None,
                 cpus: int | None = None, hostname: str | None = None, annotations: Mapping[str, str] | None = None,
                 volumes: Sequence[str] = (), net: str | None = None, ports: Sequence[str] = (),
                 dns: Sequence[str] = (), dns_search: Sequence[str] = (), dns_opt: Sequence[str] = (),
                 hosts_entries: Sequence[str] = (), env: Mapping[str, str] | None = None, kernel: str | None = None,
                 accel: str = "auto", agent_transport: str = "auto", boot: str | None = None, keep: bool = False,
                 boot_timeout: float = 60.0, stop_timeout: float | None = None, kernel_args: Sequence[str] = (),
                 debug: bool = False, store_dir: str | os.PathLike[str] | None = None,
                 backend: str | None = None, libvirt_uri: str | None = None,
                 _manifest: Any = None):

        if isinstance(apps, (App, str)):
            apps = [apps]
        if _manifest is None:
            if not apps:
                raise UsageError("Pod: give at least one app (an image, or an App)")
            self.apps = [(a if isinstance(a, App) else App(a)).overrides() for a in apps]
            pod_isolators: list[Any] = []
            pod_volumes: list[Any] = []
            manifest_ports: list[str] = []
            annotations = dict(annotations or {})
        else:
            self.apps = _manifest.app_overrides()
            pod_isolators = _manifest.isolators
            pod_volumes = _manifest.volumes
            manifest_ports = [f"{p.name}:{p.host_ip + ':' if p.host_ip else ''}{p.host_port}" for p in _manifest.ports]
            annotations = {**_manifest.annotations, **(annotations or {})}
        for choice, allowed, flag in ((accel, ("auto", "kvm", "tcg"), "accel"),
                                      (agent_transport, ("auto", "vsock", "vhost-vsock", "vsock-user", "serial"),
                                       "agent_transport"),
                                      (boot, (None, "snapshot", "cold"), "boot"),
                                      (backend, (None, "qemu", "libvirt"), "backend")):
            if choice not in allowed:
                raise UsageError(f"Pod: {flag}={choice!r} is not one of {', '.join(map(str, allowed))}")
        if cpus is not None and (not isinstance(cpus, int) or cpus < 1):
            raise UsageError(f"Pod: cpus={cpus!r} must be a whole number of at least 1")
        self.options = RunOptions(
            memory_mib=_memory(memory), cpus=cpus, hostname=hostname, annotations=annotations,
            pod_isolators=pod_isolators, kernel=kernel, accel=accel, agent_transport=agent_transport, boot=boot,
            debug=debug, keep=keep, boot_timeout=boot_timeout, pod_env=dict(env or {}),
            backend=backend, libvirt_uri=libvirt_uri,
            kernel_args=list(kernel_args), stop_timeout=STOP_TIMEOUT if stop_timeout is None else stop_timeout,
            volumes=[*pod_volumes, *(parse_volume(v) for v in volumes)],
            network=net_request(net, [*manifest_ports, *ports], list(dns), list(dns_search), list(dns_opt),
                                list(hosts_entries)))
        self.store_dir = None if store_dir is None else str(Path(store_dir).absolute())

    @classmethod
    def from_manifest(cls, path: str | os.PathLike[str], **options: Any) -> "Pod":
        """`kvmpod run --pod-manifest FILE`: the apps, volumes, ports and annotations of an appc PodManifest."""

        return cls([], _manifest=read_pod_manifest(Path(path)), **options)

    def start(self, *, stdin: Stream = DEVNULL, stdout: Stream = PIPE, stderr: Stream = PIPE) -> "PodProcess":
        """Start the pod and return at once. stdin/stdout/stderr as with subprocess.Popen: PIPE, DEVNULL,
        a file object or descriptor, or None (this process's own). A stdin other than DEVNULL is
        forwarded to the first app (`kvmpod run --interactive`; only with a single app)."""
        if stdin != DEVNULL and len(self.apps) != 1:
            raise UsageError("Pod: stdin is forwarded to a pod of exactly one app")
        options = self.options
        if stdin != DEVNULL:
            import dataclasses

            options = dataclasses.replace(options, interactive=True)
        return PodProcess(self.store_dir, self.apps, options, stdin, stdout, stderr)

    def run(self, *, timeout: float | None = None, input: bytes | None = None, capture: bool = True,
            check: bool = False) -> PodResult:
        """Run the pod to its end and return its PodResult (the output captured unless capture=False:
        then it goes to this process's stdout and stderr). After `timeout` seconds the pod is stopped
        (SIGTERM to its apps, SIGKILL after stop_timeout) and PodTimeout raised, with the PodResult so
        far. check=True raises AppExitError for a non-zero exit status."""
        out = PIPE if capture else None
        proc = self.start(stdin=DEVNULL if input is None else PIPE, stdout=out, stderr=out)
        result = proc.communicate(input=input, timeout=timeout)
        if check and result.exit_code != 0:
            raise AppExitError(f"the pod exited with status {result.exit_code}", result)
        return result


def run(image: str | App | Sequence[str | App], *args: str, exec: str | None = None, timeout: float | None = None,
        input: bytes | None = None, capture: bool = True, check: bool = False, **options: Any) -> PodResult:
    """kvmpod.run("example.com/busybox", "-c", "echo hi", exec="/bin/sh", net="user", timeout=60): one
    app with the given exec and arguments (or a list of images/Apps), `Pod(...)` options as keywords."""
    if isinstance(image, (str, App)):
        app = image if isinstance(image, App) else App(image)
        if exec is not None or args:
            import dataclasses

            app = dataclasses.replace(app, exec=exec if exec is not None else app.exec,
                                      args=list(args) if args else app.args)
        apps: Sequence[str | App] = [app]
    else:
        if exec is not None or args:
            raise UsageError("run: exec and arguments go into each App when running several apps")
        apps = image
    return Pod(apps, **options).run(timeout=timeout, input=input, capture=capture, check=check)


class PodProcess:
    """A running pod (Pod.start()). Like subprocess.Popen: stdout/stderr (with PIPE), wait(),
    communicate(); stop() ends it as `kvmpod stop` does."""

    def __init__(self, store_dir: str | None, apps: list[Any], options: Any, stdin: Stream, stdout: Stream,
                 stderr: Stream):
        request_r, request_w = os.pipe()
        status_r, status_w = os.pipe()
        messages_r, messages_w = os.pipe()
        env = {**os.environ, "KVMPOD_RELAY": "off"}   # the worker must stay this process's child
        self._stop_timeout = options.stop_timeout
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "kvmpod.api.worker", "--request", str(request_r),
                 "--status", str(status_w), "--messages", str(messages_w), "--parent", str(os.getpid())],
                stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=(request_r, status_w, messages_w), env=env,
                cwd=os.getcwd())
        finally:
            for fd in (request_r, status_w, messages_w):
                os.close(fd)
        with os.fdopen(request_w, "wb") as f:
            pickle.dump((store_dir, apps, options), f)
        self.stdin, self.stdout, self.stderr = self._proc.stdin, self._proc.stdout, self._proc.stderr
        self.pid = self._proc.pid
        self.uuid: str | None = None
        self._outcome: dict[str, Any] | None = None
        self._messages: list[str] = []
        self.started = threading.Event()    # set once every app runs, or the pod has ended
        self._readers = [threading.Thread(target=self._read_status, args=(status_r,), daemon=True),
                         threading.Thread(target=self._read_messages, args=(messages_r,), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_status(self, fd: int) -> None:
        with os.fdopen(fd, "r") as f:
            for line in f:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if "started" in message:
                    self.uuid = str(message["started"])
                    self.started.set()
                else:
                    self._outcome = message
        self.started.set()

    def _read_messages(self, fd: int) -> None:
        with os.fdopen(fd, "r", errors="replace") as f:
            self._messages.extend(f)

    @property
    def messages(self) -> str:
        return "".join(self._messages)

    def wait_started(self, timeout: float | None = None) -> str | None:
        """Wait until every app runs (its UUID) or the pod has ended (None)."""
        self.started.wait(timeout)
        return self.uuid

    def stop(self, force: bool = False) -> None:
        """SIGTERM to the apps, SIGKILL after the pod's stop_timeout (force: the VM is killed at once)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            if force:
                self._proc.send_signal(signal.SIGTERM)  # a second signal: kvmpod kills the VM

    def _finish(self, stdout: bytes | None, stderr: bytes | None) -> PodResult:
        for reader in self._readers:
            reader.join()
        outcome = self._outcome or {"error": "VMError", "exit_code": self._proc.returncode,
                                    "message": f"the pod's worker ended without a report (exit {self._proc.returncode})"}
        result = PodResult(int(outcome.get("exit", outcome.get("exit_code", errors.EXIT_KVMPOD_FAILURE))),
                           stdout, stderr, self.messages, self.uuid)
        if "error" in outcome:
            raise _error(outcome, result)
        return result

    def _stop_after_timeout(self) -> tuple[bytes | None, bytes | None]:
        self.stop()
        try:
            return self._proc.communicate(timeout=self._stop_timeout + KILL_GRACE)
        except subprocess.TimeoutExpired:
            self._proc.kill()  # its QEMU dies with it (the pod directory stays: `kvmpod gc`)
            return self._proc.communicate()

    def communicate(self, input: bytes | None = None, timeout: float | None = None) -> PodResult:
        """Feed `input` to the app, read the output to its end, wait for the pod; PodTimeout after
        `timeout` seconds (the pod stopped), the kvmpod.errors class of a failure."""
        self._forget_closed_streams()
        try:
            stdout, stderr = self._proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired as cause:
            late_out, late_err = self._stop_after_timeout()
            result: PodResult | None
            try:
                result = self._finish(late_out, late_err)
            except KvmpodError as e:
                result = getattr(e, "result", None)
            raise PodTimeout(f"the pod did not end within {timeout} s: stopped", result) from cause
        return self._finish(stdout, stderr)

    def wait(self, timeout: float | None = None) -> PodResult:
        """Wait for the pod to end (streams of PIPE are the caller's to read meanwhile); PodTimeout after
        `timeout` seconds, the pod stopped."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            self.stop()
            try:
                self._proc.wait(self._stop_timeout + KILL_GRACE)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            raise PodTimeout(f"the pod did not end within {timeout} s: stopped") from e
        return self._finish(None, None)

    def __enter__(self) -> "PodProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving the block stops a pod still running and waits for it, the output it still had unread."""
        if self._proc.poll() is None:
            self.stop()
        self._forget_closed_streams()
        self._proc.communicate()

    def _forget_closed_streams(self) -> None:
        """Streams the caller closed are not Popen's to flush or read any more."""
        for name in ("stdin", "stdout", "stderr"):
            stream = getattr(self._proc, name)
            if stream is not None and stream.closed:
                setattr(self._proc, name, None)


def _error(outcome: Mapping[str, Any], result: PodResult) -> KvmpodError:
    """The worker's report as the kvmpod.errors class the CLI would have reported (KvmpodError for one
    this version does not know), with its message, exit code and the PodResult."""
    name = str(outcome.get("error"))
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, KvmpodError)):
        cls = KvmpodError
    error = cls.__new__(cls)
    Exception.__init__(error, str(outcome.get("message", "")) if name != "internal"
                       else f"internal error: {outcome.get('message', '')}")
    error.exit_code = result.exit_code
    error.result = result  # type: ignore[attr-defined]
    return error
