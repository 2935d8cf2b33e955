"""`kvmpod-oci`: the OCI runtime command line that runc defined, as podman 4.3 (through conmon 2.1) and
containerd 1.6's runc shim call it (docs/oci-runtime.md).

    kvmpod-oci [--root DIR] [--log FILE] [--log-format text|json] [--systemd-cgroup] [--debug] COMMAND ...

Commands: create, start, state, kill, delete, exec, pause, resume, list, ps, features. Any other
command or flag is refused with one line naming it — never a silent success.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence, TextIO

from kvmpod.version import __version__
from kvmpod.errors import KvmpodError, UsageError
from kvmpod.oci_runtime import container as ctr
from kvmpod.oci_runtime import runtime_log
from kvmpod.oci_runtime.bundle import CAPABILITIES, NAMESPACES
from kvmpod.oci_runtime.execute import ExecRequest, execute
from kvmpod.oci_runtime.records import DEFAULT_ROOT, OCI_VERSION, Records
from kvmpod.outcome import exit_now
from kvmpod.startup import own_the_process

PROG = "kvmpod-oci"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _no_extra_fds(text: str) -> int:
    if text != "0":
        raise argparse.ArgumentTypeError("passing extra file descriptors into a VM is not supported")
    return 0


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Run OCI containers, each in its own kvmpod VM (an OCI runtime for "
                                      "podman and containerd; docs/oci-runtime.md).")
    p.add_argument("--version", "-v", action="version", version=f"{PROG} {__version__} (runtime-spec {OCI_VERSION})")
    p.add_argument("--root", default=str(DEFAULT_ROOT), metavar="DIR",
                   help=f"where container state is kept (default {DEFAULT_ROOT})")
    p.add_argument("--log", metavar="FILE", help="the runtime's log (default: stderr)")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--systemd-cgroup", action="store_true",
                   help="accepted: a pod's cgroup placement is kvmpod's own (docs/oci-runtime.md)")
    p.add_argument("--debug", action="store_true", help="kvmpod's debug messages in the log")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    create = sub.add_parser("create", help="create a container (its VM boots; the app waits for start)")
    create.add_argument("--bundle", "-b", default=".", metavar="DIR")
    create.add_argument("--pid-file", metavar="FILE")
    create.add_argument("--console-socket", metavar="SOCKET")
    create.add_argument("--no-pivot", action="store_true", help="accepted: the guest agent sets up the root")
    create.add_argument("--no-new-keyring", action="store_true", help="accepted: the VM has its own keyrings")
    create.add_argument("--preserve-fds", type=_no_extra_fds, default=0, metavar="0")
    create.add_argument("id", metavar="ID")

    start = sub.add_parser("start", help="start the app of a created container")
    start.add_argument("id", metavar="ID")
    state = sub.add_parser("state", help="the container's state as runtime-spec JSON")
    state.add_argument("id", metavar="ID")
    kill = sub.add_parser("kill", help="send a signal (default SIGTERM) to the container's app")
    kill.add_argument("--all", "-a", action="store_true", help="every process of the container (the VM's apps)")
    kill.add_argument("id", metavar="ID")
    kill.add_argument("signal", nargs="?", default="SIGTERM", metavar="SIGNAL")
    delete = sub.add_parser("delete", help="remove a container (--force: even a running one)")
    delete.add_argument("--force", "-f", action="store_true")
    delete.add_argument("id", metavar="ID")
    for name, text in (("pause", "stop the VM's vCPUs"), ("resume", "let a paused VM's vCPUs run")):
        one = sub.add_parser(name, help=text)
        one.add_argument("id", metavar="ID")

    ex = sub.add_parser("exec", help="run one more process in a running container")
    ex.add_argument("--process", "-p", metavar="FILE", help="a runtime-spec process object (JSON)")
    ex.add_argument("--tty", "-t", action="store_true")
    ex.add_argument("--console-socket", metavar="SOCKET")
    ex.add_argument("--detach", "-d", action="store_true")
    ex.add_argument("--pid-file", metavar="FILE")
    ex.add_argument("--cwd", metavar="DIR")
    ex.add_argument("--env", "-e", action="append", default=[], metavar="NAME=VALUE")
    ex.add_argument("--user", "-u", metavar="UID[:GID]")
    ex.add_argument("--preserve-fds", type=_no_extra_fds, default=0, metavar="0")
    ex.add_argument("id", metavar="ID")
    ex.add_argument("args", nargs=argparse.REMAINDER, metavar="COMMAND")

    ls = sub.add_parser("list", help="the containers under --root")
    ls.add_argument("--format", "-f", choices=["table", "json"], default="table")
    ls.add_argument("--quiet", "-q", action="store_true", help="IDs only")
    ps = sub.add_parser("ps", help="the container's host processes (its pod process)")
    ps.add_argument("--format", "-f", choices=["table", "json"], default="table")
    ps.add_argument("id", metavar="ID")
    sub.add_parser("features", help="what this runtime implements (runtime-spec features.md), as JSON")
    return p


def _list(records: Records, fmt: str, quiet: bool) -> int:
    states = [c.state() for c in records.all()]
    if quiet:
        for s in states:
            print(s["id"])
    elif fmt == "json":
        print(json.dumps(states))
    else:
        print(f"{'ID':<24} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} CREATED")
        for s in states:
            print(f"{s['id']:<24} {s['pid']:<8} {s['status']:<10} {s['bundle']:<40} {s['created']}")
    return 0


def _ps(records: Records, container_id: str, fmt: str) -> int:
    container = records.get(container_id)
    pids = [container.pid] if container.alive else []
    if fmt == "json":
        print(json.dumps(pids))
    else:
        print("PID")
        for pid in pids:
            print(pid)
    return 0


def _features() -> int:
    print(json.dumps({
        "ociVersionMin": "1.0.0", "ociVersionMax": OCI_VERSION, "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec", "rprivate", "private"],
        "linux": {"namespaces": sorted(NAMESPACES),
                  "capabilities": sorted(_capabilities()),
                  "cgroup": {"v1": False, "v2": False, "systemd": False, "systemdUser": False},
                  "seccomp": {"enabled": True, "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                                                           "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
                                                           "SCMP_ACT_LOG", "SCMP_ACT_TRAP"],
                              "operators": [], "archs": ["SCMP_ARCH_X86_64"]},
                  "apparmor": {"enabled": False}, "selinux": {"enabled": False}},
        "annotations": {"io.kvmpod.runtime": "vm", "io.kvmpod.version": __version__},
    }, indent=2))
    return 0


def _capabilities() -> list[str]:
    return list(CAPABILITIES)


def dispatch(ns: argparse.Namespace, log: TextIO) -> int:
    records = Records(Path(ns.root))
    command = ns.command
    if command == "create":
        return ctr.create(records, ctr.CreateRequest(ns.id, Path(ns.bundle), ns.pid_file, ns.console_socket),
                          ctr.Globals(Path(ns.root), ns.log, ns.log_format, ns.debug, ns.systemd_cgroup), log)
    if command == "start":
        return ctr.start(records, ns.id)
    if command == "state":
        return ctr.state(records, ns.id)
    if command == "kill":
        return ctr.kill(records, ns.id, ctr.parse_signal(ns.signal))
    if command == "delete":
        return ctr.delete(records, ns.id, ns.force)
    if command in ("pause", "resume"):
        return ctr.set_paused(records, ns.id, command == "pause")
    if command == "exec":
        args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
        return execute(records, ExecRequest(ns.id, args, ns.process, ns.tty, ns.console_socket, ns.detach,
                                            ns.pid_file, ns.cwd, ns.env, ns.user))
    if command == "list":
        return _list(records, ns.format, ns.quiet)
    if command == "ps":
        return _ps(records, ns.id, ns.format)
    if command == "features":
        return _features()
    raise UsageError(f"{PROG}: give a command (create, start, state, kill, delete, exec, pause, resume, list, "
                     "ps, features)")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    log: TextIO = sys.stderr
    fmt = "text"
    try:
        ns = build_parser().parse_args(words)
        fmt = ns.log_format
        log = runtime_log.open_log(ns.log, ns.log_format)
        runtime_log.configure(log, ns.log_format, ns.debug)
        return dispatch(ns, log)
    except KvmpodError as e:
        _error(log, fmt, str(e))
        return e.exit_code if e.exit_code != 125 else 1
    except KeyboardInterrupt:
        _error(log, fmt, "interrupted")
        return 130
    except Exception as e:  # a bug: one line, with the class, like kvmpod's CLI
        _error(log, fmt, f"internal error: {type(e).__name__}: {e}")
        if os.environ.get("KVMPOD_OCI_TRACEBACK"):
            raise
        return 1


def _error(log: TextIO, fmt: str, message: str) -> None:
    """One line, in the log (and on stderr too when the log is a file: runc's callers read either)."""
    if fmt == "json" and log is not sys.stderr:
        print(runtime_log.JsonFormatter().format(_record(message)), file=log, flush=True)
    elif log is not sys.stderr:
        print(f"{PROG}: error: {message}", file=log, flush=True)
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _record(message: str):
    import logging

    return logging.LogRecord("kvmpod-oci", logging.ERROR, __file__, 0, message, None, None)


def entry() -> None:
    own_the_process()   # the pod's second half imports with the GC paused (kvmpod/startup.py)
    exit_now(main())
