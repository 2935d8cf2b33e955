"""`kvmpod run --detach`: the pod gets its own kvmpod process, the command returns once the apps run.

The command forks before anything slow. The child becomes the pod's owner (its own session, stdin
/dev/null; state.json's kvmpod_pid is its pid, since it makes the pod directory) and runs the pod
with the apps' output going to <pod dir>/logs/<app>.log. Until the apps have started it keeps the
command's stdout and stderr, so notices and errors still reach the user; then it points them at
/dev/null and reports on a pipe. The parent prints the pod's UUID and exits 0 on that report, or
prints the child's error and exits with its status when startup failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys

from kvmpod.errors import EXIT_KVMPOD_FAILURE, KvmpodError
from kvmpod.pod.options import RunOptions
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.run import run_pod
from kvmpod.pod.spec import AppOverrides


class StartupReport:
    """The child's end of the pipe: one JSON line, {"uuid": ...} or {"error": ..., "exit_code": N}."""

    def __init__(self, fd: int):
        self.fd = fd

    def _send(self, message: dict) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            os.write(fd, (json.dumps(message) + "\n").encode())
        except OSError:
            pass  # the command is gone (interrupted): the pod runs on regardless
        finally:
            os.close(fd)

    def started(self, pod: PodDir) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
        self._send({"uuid": pod.uuid})

    def failed(self, message: str, exit_code: int) -> None:
        self._send({"error": message, "exit_code": exit_code})


def _child(apps: list[AppOverrides], options: RunOptions, fd: int) -> None:
    code = EXIT_KVMPOD_FAILURE
    report = StartupReport(fd)
    try:
        os.setsid()  # no terminal signals, no hangup when the command's session ends
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        code = asyncio.run(run_pod(apps, dataclasses.replace(options, on_started=report.started)))
        report.failed("the pod ended before its apps had started", code or EXIT_KVMPOD_FAILURE)
    except KvmpodError as e:
        code = e.exit_code
        report.failed(str(e), e.exit_code)
    except BaseException as e:  # a bug: one line, like the CLI says it
        report.failed(f"internal error: {type(e).__name__}: {e}", EXIT_KVMPOD_FAILURE)
    finally:
        os._exit(code)


def run_detached(apps: list[AppOverrides], options: RunOptions) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _child(apps, options, wfd)
    os.close(wfd)
    return _wait_for_report(pid, rfd)


def _wait_for_report(pid: int, fd: int) -> int:
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    except KeyboardInterrupt:
        os.kill(pid, signal.SIGTERM)  # the user gave up before the pod was up: it goes
        raise
    finally:
        os.close(fd)
    try:
        report = json.loads(data) if data else {}
    except ValueError:
        report = {}
    if isinstance(report.get("uuid"), str):
        print(report["uuid"], flush=True)
        return 0
    _, status = os.waitpid(pid, 0)  # the child cleans up after a failed start: let it finish
    if isinstance(report.get("error"), str):
        error = KvmpodError(report["error"])
        code = report.get("exit_code")
        error.exit_code = code if isinstance(code, int) and 0 < code < 256 else EXIT_KVMPOD_FAILURE
        raise error
    raise KvmpodError(f"the pod's kvmpod process ended during startup (wait status {status})")
