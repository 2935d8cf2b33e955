"""The enter, stop and gc entrypoints: the kvmpod pod behind an rkt pod, reached as `kvmpod enter`,
`kvmpod stop` and `kvmpod gc` reach theirs (its control socket, kvmpod/pod/client.py; its registry
entry, kvmpod/pod/registry.py). stage0 runs each with the rkt pod directory as working directory;
run recorded there where the kvmpod pod directory is (kvmpod/stage1/poddir.py), so these work
whatever their environment.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kvmpod import paths
from kvmpod.outcome import configure_logging
from kvmpod.pod.registry import PodInfo, remove
from kvmpod.stage1.flags import Stage1Error, parse_enter, parse_gc, parse_stop
from kvmpod.stage1.poddir import PID_FILE, read_record

log = logging.getLogger(__name__)
STOP_TIMEOUT = 10.0   # seconds the apps get after SIGTERM before SIGKILL (kvmpod stop's default)


def kvmpod_pod_dir(root: Path, uuid: str | None) -> Path:
    """The kvmpod pod directory of the rkt pod in `root`: as run recorded it, else by UUID (enter is
    given none: rkt's pod directory is named by it)."""
    recorded = read_record(root)
    if recorded is not None:
        return recorded
    return paths.pods_dir() / (uuid or root.name)


def _pod_info(path: Path) -> PodInfo:
    return PodInfo(path.name, path, {}).reloaded()


def enter(argv: list[str]) -> int:
    """`--pid=PID --appname=NAME -- CMD...`: CMD in the app, a terminal when stdin is one; its exit status."""
    from kvmpod.pod.client import EnterRequest  # the control client pulls asyncio: not for gc
    from kvmpod.pod.client import enter as enter_pod

    args = parse_enter(argv)
    root = Path.cwd()
    path = kvmpod_pod_dir(root, None)
    if not path.is_dir():
        raise Stage1Error(f"enter: {root}: the pod is not running (no kvmpod pod for it)")
    pod = _pod_info(path)
    running_pid = pod.state.get("kvmpod_pid")
    if running_pid != args.pid:  # stage0 read it from our `pid` file: anything else is another pod's
        raise Stage1Error(f"enter: --pid={args.pid} is not this pod's process ({root / PID_FILE}: {running_pid})")
    return enter_pod(pod, EnterRequest(args.command, app=args.appname))


def stop(argv: list[str]) -> int:
    """`[--force] UUID`: SIGTERM to the apps, SIGKILL after 10 s, power-off; --force: the VM at once.
    Returns once the pod's process has exited (so rkt sees the lock free). A pod that ended is fine."""
    from kvmpod.pod.client import stop as stop_pod  # as in enter()

    args = parse_stop(argv)
    path = kvmpod_pod_dir(Path.cwd(), args.uuid)
    if not path.is_dir():
        return 0
    stop_pod(_pod_info(path), STOP_TIMEOUT, args.force)
    return 0


def gc(argv: list[str]) -> int:
    """`[--debug] [--local-config DIR] UUID`: release what the pod held (a QEMU or virtiofsd that
    outlived a SIGKILLed run, leases, port forwards, CNI namespaces, its sockets and kvmpod directory).
    Idempotent: a pod with nothing left is fine."""
    args = parse_gc(argv)
    configure_logging(args.debug)
    path = kvmpod_pod_dir(Path.cwd(), args.uuid)
    if not path.exists():
        log.debug("gc: pod %s has nothing left to release", args.uuid)
        return 0
    remove(_pod_info(path))   # refuses a pod whose process still runs; raises if a network is stuck
    log.debug("gc: released pod %s (%s)", args.uuid, path)
    return 0
