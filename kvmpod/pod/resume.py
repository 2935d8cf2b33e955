"""`python -m kvmpod.pod.resume`: a pod's kvmpod process coming back from kvmpod-relay (kvmpod/pod/relay.py).

kvmpod-relay execs this with the hand-over record the process left (--state), the agent bytes it read
but did not relay (--unread), why it came back (--why), the signal it took if that was why (--signal),
the output fds that failed meanwhile (--broken) and the pod directory (--pod). It is not a command for
users: every fd it names was inherited across two execs of the same process.

The record was written by the kvmpod that was installed when the pod went quiet, and is read by the
one installed now (an upgrade or a `git pull` may have come in between). One this code cannot read
(handover.py: another version, not a record at all, a body that does not fit) does not leave the pod
running with nobody to answer for it, nor a traceback: the pod ends as a failed pod ends, from what the
record's envelope says (or, without one, from what this process and its pod directory tell), and the
reason is one `kvmpod: error:` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from kvmpod import paths
from kvmpod.errors import KvmpodError
from kvmpod.net.spec import NetRequest
from kvmpod.outcome import configure_logging, exit_now, reporting_failures
from kvmpod.pod import audit
from kvmpod.pod.handover import HandoverError, read_record
from kvmpod.pod.options import RunOptions
from kvmpod.pod.poddir import PodDir, process_start_time
from kvmpod.pod.run import _failed, _release, run_after_relay
from kvmpod.pod.state import Lifecycle, StateError

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # arguments from another kvmpod's relay: end the pod, cleanly
        raise HandoverError(f"kvmpod-relay's way back gave arguments this kvmpod does not take: {message}")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="kvmpod.pod.resume")
    parser.add_argument("--state", type=int, required=True)
    parser.add_argument("--unread", type=int, required=True)
    parser.add_argument("--why", default="")
    parser.add_argument("--signal", type=int, default=0)
    parser.add_argument("--broken", type=int, action="append", default=[])
    parser.add_argument("--pod", default=None)   # the pod directory (not given by kvmpod before the versioned record)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    debug = False

    def comeback() -> int:
        nonlocal debug
        args = None
        try:
            args = _parse(sys.argv[1:] if argv is None else argv)
            state = read_record(args.state)
        except HandoverError as e:
            debug = e.envelope is not None and e.envelope.debug
            configure_logging(debug)
            raise end_unread_pod(e, args.pod if args else None) from e
        debug = state.options.debug
        with os.fdopen(args.unread, "rb") as f:
            unread = f.read()
        configure_logging(debug)
        log.debug("idle relay: back (%s)", args.why)
        return asyncio.run(run_after_relay(state, unread, set(args.broken), args.signal))

    exit_now(reporting_failures(comeback, lambda: debug))


def end_unread_pod(error: HandoverError, pod_path: str | None) -> KvmpodError:
    """The pod of a record this code cannot read, ended as run.py ends a failed pod: QEMU killed and
    reaped, state.json `failed` with the error, the audit log's end, the network released, the pod
    directory removed unless --keep or --detach kept it. Returns the error to report.

    The envelope says which pod and QEMU, and whether the directory stays. Without one: QEMU is among
    this process's children (it is the only one a relayed pod has), the pod is the one whose state.json
    names this process, and its directory stays (no one can tell whether it was to), `failed`, for
    `kvmpod gc`."""
    envelope = error.envelope
    _kill_children(envelope.qemu_pid if envelope else None)
    pod = _own_pod(envelope.path if envelope else Path(pod_path) if pod_path else None)
    stopped = KvmpodError(f"{error}: the pod was stopped")
    if pod is None:
        return KvmpodError(f"{stopped} (its pod directory was not found)")
    if envelope is not None:
        options = RunOptions(keep=envelope.keep, detach=envelope.detach, network=NetRequest(envelope.network_mode))
        timings = {"apps_started": 0.0} if envelope.apps_started else {}
    else:
        options, timings = RunOptions(keep=True), {}
    with contextlib.suppress(OSError, StateError, ValueError):  # a state.json it cannot update: gc's to judge
        ended = Lifecycle(pod).end()
        pod.update(host_process="kvmpod")
        audit.pod_ended(pod.uuid, ended.value, pod.state.get("apps", []))
    reported = _failed(pod, options, stopped)
    asyncio.run(_release(None, pod, options, timings))
    return reported


def _children() -> set[int]:
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            found |= {int(pid) for pid in (task / "children").read_text().split()}
    return found


def _kill_children(qemu_pid: int | None) -> None:
    """SIGKILL QEMU (`qemu_pid`, if it is this process's child; else every child) and reap it: it must
    not outlive the pod, and its taps and files must be free before the network and directory go."""
    children = _children()
    for pid in sorted({qemu_pid} if qemu_pid in children else children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _own_pod(path: Path | None) -> PodDir | None:
    """The pod directory at `path` (else the one found among the pods) whose state.json names this
    process as its owner: no other pod's directory is touched."""
    me = (os.getpid(), process_start_time(os.getpid()))
    pods = paths.pods_dir()
    candidates = ([path] if path is not None else []) + (sorted(pods.iterdir()) if pods.is_dir() else [])
    for candidate in candidates:
        try:
            state = json.loads((candidate / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and (state.get("kvmpod_pid"), state.get("kvmpod_start")) == me:
            return PodDir(str(state.get("uuid", candidate.name)), candidate, state)
    return None


if __name__ == "__main__":
    main()
