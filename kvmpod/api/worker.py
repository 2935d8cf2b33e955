"""`python -m kvmpod.api.worker`: the process that runs one pod for the Python API (kvmpod/api/pod.py).

It runs `kvmpod run`'s own implementation, kvmpod.pod.entry.run(), with the AppOverrides and RunOptions
the API built (pickled on the request fd). Its fds 0, 1 and 2 are the apps' stdin, stdout and stderr;
kvmpod's own messages (notices, --debug logging) go to the messages fd, and what happened goes to the
status fd as JSON lines: {"started": UUID} once every app runs, then {"exit": N} or {"error": CLASS,
"message": ..., "exit_code": N}. The idle relay is off here (KVMPOD_RELAY=off, set by the API): it
would exec this process away from the status fd. SIGTERM stops the pod as it does `kvmpod run`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import signal
import sys
import traceback

from kvmpod import paths
from kvmpod.errors import EXIT_KVMPOD_FAILURE, Interrupted, KvmpodError
from kvmpod.outcome import configure_logging, exit_now
from kvmpod.pod.entry import run
from kvmpod.startup import own_the_process


def _die_with_parent() -> None:
    """The API's process is the pod's owner: if it dies, SIGTERM stops the pod (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvmpod.api.worker")
    parser.add_argument("--request", type=int, required=True)
    parser.add_argument("--status", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    _die_with_parent()
    if os.getppid() != args.parent:  # the parent died before prctl took effect
        os._exit(143)
    status = os.fdopen(args.status, "w", buffering=1)
    sys.stderr = os.fdopen(args.messages, "w", buffering=1)
    with os.fdopen(args.request, "rb") as f:
        store_dir, apps, options = pickle.load(f)

    def report(**message: object) -> None:
        status.write(json.dumps(message) + "\n")

    configure_logging(options.debug)
    if store_dir is not None:
        paths.set_store_dir(store_dir)
    options.output_fds = (1, 2)   # the apps' output: fds 1 and 2; sys.stderr is kvmpod's messages

    def stopped_while_planning(signo: int, _frame: object) -> None:
        # SIGTERM (the API's stop or timeout) before the pod's own handlers are installed: unwind, so that
        # the planning half removes the pod directory and QEMU it may have made (launch.plan_pod)
        raise Interrupted("stopped before its apps started", 128 + signo)

    signal.signal(signal.SIGTERM, stopped_while_planning)
    options.on_started = lambda pod: report(started=pod.uuid)
    try:
        code = run(apps, options)
        report(exit=code)
    except KvmpodError as e:
        code = e.exit_code
        report(error=type(e).__name__, message=str(e), exit_code=code)
    except KeyboardInterrupt:
        code = 130
        report(error="Interrupted", message="interrupted", exit_code=code)
    except Exception as e:  # a bug: the class and message, the traceback among the messages
        traceback.print_exc()
        code = EXIT_KVMPOD_FAILURE
        report(error="internal", message=f"{type(e).__name__}: {e}", exit_code=code)
    status.close()
    exit_now(code)


if __name__ == "__main__":
    own_the_process()   # a process of kvmpod's own: the pod's second half imports with the GC paused
    main()
