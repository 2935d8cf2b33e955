"""`exec`: one more process in a running container, through the pod's control socket (as `kvmpod
enter`). Its host end is a process that lives exactly as long as the guest process and ends with its
status; if that host process is killed, the guest process is killed with it (kill_on_hangup). With
--detach (conmon's way) the command forks that process, writes its pid to --pid-file once the guest
process runs, and returns; without, the command is the process.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmpod.errors import EXIT_KVMPOD_FAILURE, KvmpodError
from kvmpod.fsutil import write_atomically
from kvmpod.oci_runtime.bundle import env_list, get_field, read_json_object, str_list, uint_field
from kvmpod.oci_runtime.console import become_terminal, send_console
from kvmpod.oci_runtime.container import die_like, read_report
from kvmpod.oci_runtime.records import ContainerStateError, Records
from kvmpod.pod.client import EnterRequest, EnterSession, connect, fill_std_fds


@dataclass
class ExecRequest:
    container_id: str
    args: list[str]
    process_file: str | None = None
    tty: bool = False
    console_socket: str | None = None
    detach: bool = False
    pid_file: str | None = None
    cwd: str | None = None
    env: list[str] = field(default_factory=list)
    user: str | None = None     # UID[:GID]


def read_process(path: str) -> dict[str, Any]:
    """The --process file: a runtime-spec `process` object."""
    return read_json_object(Path(path), f"--process {path}")


def enter_request(req: ExecRequest) -> tuple[EnterRequest, bool]:
    """What to run and whether it has a terminal: the --process file, or the flags and arguments."""
    if req.process_file:
        process = read_process(req.process_file)
        args = str_list(process, "args", "process.")
        user = get_field(process, "user", dict, "process.", {})
        uid, gid = uint_field(user, "uid", "process.user."), uint_field(user, "gid", "process.user.")
        env, cwd, tty = env_list(process), get_field(process, "cwd", str, "process."), get_field(process, "terminal", bool,
                                                                               "process.", False)
        user_name, group_name = (str(uid) if uid is not None else None), (str(gid) if gid is not None else None)
    else:
        args, env, cwd, tty = req.args, req.env, req.cwd, req.tty
        user_name, _, group = (req.user or "").partition(":")
        user_name, group_name = user_name or None, group or None
    if not args or not args[0]:
        raise KvmpodError("exec: no command to run")
    if cwd is not None and not cwd.startswith("/"):
        raise KvmpodError(f"exec: working directory {cwd!r} is not absolute")
    return EnterRequest(argv=list(args), env=list(env), user=user_name, group=group_name, workdir=cwd,
                        kill_on_hangup=True), tty or req.tty


def execute(records: Records, req: ExecRequest) -> int:
    container = records.get(req.container_id)
    if container.status != "running":
        raise ContainerStateError(f"container {req.container_id} is {container.status}, not running")
    pod = container.pod
    assert pod is not None
    enter, tty = enter_request(req)
    if tty and not req.console_socket and not os.isatty(0):
        raise KvmpodError("exec: a terminal needs --console-socket (or a terminal on stdin)")
    if not req.detach:
        fill_std_fds()
        if req.pid_file:
            write_atomically(Path(req.pid_file), str(os.getpid()).encode())
        slave = send_console(req.console_socket) if tty and req.console_socket else None
        if slave is not None:
            become_terminal(slave)
        with connect(pod) as sock:
            return EnterSession(sock, tty).run(enter)
    return _detached(pod, enter, tty, req)


def _detached(pod, enter: EnterRequest, tty: bool, req: ExecRequest) -> int:
    fill_std_fds()
    slave = send_console(req.console_socket) if tty and req.console_socket else None
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        code = EXIT_KVMPOD_FAILURE

        def started(guest_pid: int) -> None:
            os.write(wfd, json.dumps({"pid": guest_pid}).encode())
            os.close(wfd)

        try:
            if slave is not None:
                become_terminal(slave)
            else:
                os.setsid()
            with connect(pod) as sock:
                code = EnterSession(sock, tty).run(enter, on_started=started)
        except KvmpodError as e:
            try:
                os.write(wfd, json.dumps({"error": str(e)}).encode())
            except OSError:
                os.write(2, f"kvmpod-oci: error: {e}\n".encode(errors="replace"))
            code = e.exit_code
        except BaseException as e:
            code = EXIT_KVMPOD_FAILURE
            os.write(2, f"kvmpod-oci: internal error: {type(e).__name__}: {e}\n".encode(errors="replace"))
        die_like(code)
    os.close(wfd)
    if slave is not None:
        os.close(slave)
    report = read_report(rfd)
    if not isinstance(report.get("pid"), int):
        os.waitpid(pid, 0)
        raise KvmpodError(str(report.get("error") or "exec: the process's host end ended before it started"))
    if req.pid_file:
        write_atomically(Path(req.pid_file), str(pid).encode())
    return 0
