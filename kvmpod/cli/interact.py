"""`kvmpod enter`, `logs`, `stop` and `rm`: working with a pod another kvmpod process runs."""

from __future__ import annotations

import argparse
import sys

from kvmpod.errors import EXIT_KVMPOD_FAILURE, KvmpodError
from kvmpod.pod.client import EnterRequest, enter, print_logs, stop
from kvmpod.pod.registry import find_pod, remove

DEFAULT_COMMAND = ["/bin/sh"]


def enter_command(words: list[str]) -> list[str]:
    """The command after `--` (argparse never sees it); none: a shell."""
    return list(words) or list(DEFAULT_COMMAND)


def cmd_enter(ns: argparse.Namespace) -> int:
    pod = find_pod(ns.uuid)
    request = EnterRequest(enter_command(ns.command), app=ns.app, env=[f"{k}={v}" for k, v in ns.set_env],
                           user=ns.user, group=ns.group, workdir=ns.working_dir)
    return enter(pod, request)


def cmd_logs(ns: argparse.Namespace) -> int:
    print_logs(find_pod(ns.uuid), ns.app, ns.follow)
    return 0


def _each_pod(prefixes: list[str], action) -> int:
    """Runs `action` on every pod named, past failures; 125 if any failed."""

    failed = False
    for prefix in prefixes:
        try:
            pod = find_pod(prefix)
            action(pod)
        except KvmpodError as e:
            print(f"kvmpod: error: {e}", file=sys.stderr, flush=True)
            failed = True
            continue
        print(pod.uuid, flush=True)
    return EXIT_KVMPOD_FAILURE if failed else 0


def cmd_stop(ns: argparse.Namespace) -> int:
    return _each_pod(ns.uuids, lambda pod: stop(pod, ns.timeout, ns.force))


def cmd_rm(ns: argparse.Namespace) -> int:
    return _each_pod(ns.uuids, remove)
