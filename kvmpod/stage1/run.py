"""The `coreos.com/rkt/stage1/run` entrypoint: the pod stage0 rendered, run as a kvmpod pod.

stage0 execs it with the pod directory as the working directory and RKT_LOCK_FD; this process is the
pod's process from then on (it is the pid written to `pid`) and holds the lock until the pod is gone.
Each app runs from its rendered rootfs directory, shared with the guest over virtio-fs (what it writes
lands there, as with rkt), with kvmpod's executor rules, volumes, networks and isolators; every app's
exit status is written to stage1/rootfs/rkt/status/<app>, and the exit status is rkt's: the first app
to fail stops the pod and its status is the pod's, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from kvmpod import paths
from kvmpod.image.manifest import App, Isolator
from kvmpod.outcome import configure_logging
from kvmpod.pod.entry import run as run_pod
from kvmpod.pod.options import RunOptions
from kvmpod.pod.spec import AppOverrides
from kvmpod.stage1.flags import RunArgs, Stage1Error, parse_run
from kvmpod.stage1.lock import hold_pod_lock
from kvmpod.stage1.network import net_request
from kvmpod.stage1.poddir import RktApp, RktPod, read_pod

log = logging.getLogger(__name__)

CAPS_ISOLATORS = ("os/linux/capabilities-retain-set", "os/linux/capabilities-remove-set")
SECCOMP_ISOLATORS = ("os/linux/seccomp-retain-set", "os/linux/seccomp-remove-set")
# every capability the guest agent knows (guest-agent/src/caps.c, linux/capability.h numbers 0-40):
# --disable-capabilities-restriction gives an app all of them as its bounding set
ALL_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)


def pod_hostname(args: RunArgs) -> str:
    """--hostname, else rkt's default rkt-<UUID> (the guide, interface version 2)."""
    from kvmpod.cli.types import hostname  # importing kvmpod.cli loads its whole parser: only here

    try:
        return hostname(args.hostname or f"rkt-{args.uuid}")
    except argparse.ArgumentTypeError as e:
        raise Stage1Error(f"run: --hostname: {e}") from e


def app_object(app: RktApp, args: RunArgs) -> App | None:
    """The app as the pod manifest gives it (else its image's), less what --disable-* lifts."""
    obj = app.pod_app.app or app.manifest.app
    if obj is None or not (args.disable_seccomp or args.disable_capabilities):
        return obj
    isolators = list(obj.isolators)
    if args.disable_seccomp:
        isolators = [i for i in isolators if i.name not in SECCOMP_ISOLATORS]
    if args.disable_capabilities:
        isolators = [i for i in isolators if i.name not in CAPS_ISOLATORS]
        isolators.append(Isolator(CAPS_ISOLATORS[0], {"set": list(ALL_CAPABILITIES)}))
    return dataclasses.replace(obj, isolators=isolators)


def app_overrides(app: RktApp, args: RunArgs) -> AppOverrides:
    """One app as kvmpod's run path takes it: rooted in its rendered directory, with its manifest."""
    base = app.pod_app.overrides()
    return dataclasses.replace(
        base, image=app.pod_app.image_name or app.manifest.name, app=app_object(app, args),
        annotations=dict(app.annotations), rootfs_dir=app.rootfs, image_manifest=app.manifest,
        image_id=app.pod_app.image_id)


def check_supported(args: RunArgs, pod: RktPod) -> None:
    """What kvmpod's stage1 refuses, before anything is started."""
    if args.private_users:
        raise Stage1Error(f"run: --private-users={args.private_users}: user namespaces do not apply to a pod VM "
                          "(its apps are isolated by the hypervisor)")
    if args.mutable or pod.mutable:
        raise Stage1Error("run: mutable pods (rkt app add/start/stop/rm) are not supported by kvmpod's stage1")
    if args.interactive and len(pod.apps) != 1:
        raise Stage1Error(f"run: --interactive needs a pod of exactly one app (this one has {len(pod.apps)})")


def run(argv: list[str]) -> int:
    args = parse_run(argv)
    configure_logging(args.debug)
    root = Path.cwd()
    hold_pod_lock(root)   # kept open (close-on-exec) in this process, which is the pod's for its life
    pod = read_pod(root, args.uuid)
    check_supported(args, pod)
    apps = [app_overrides(app, args) for app in pod.apps]
    network = net_request(args, root, pod.manifest.ports)
    if args.mds_token:
        log.debug("--mds-token given: the apps use the metadata service inside their VM (docs/stage1.md)")
    if args.disable_paths:
        log.debug("--disable-paths: nothing to lift, kvmpod masks no /proc or /sys paths in the guest")

    def started(_pod_dir) -> None:
        pod.write_pid(os.getpid())   # what `rkt enter` waits for, so it finds the apps running
        pod.mark_ready()

    def exited(statuses) -> None:
        for name, status in statuses:
            pod.write_status(name, status.shell_code)

    options = RunOptions(
        hostname=pod_hostname(args), debug=args.debug, interactive=args.interactive,
        annotations=dict(pod.annotations), pod_isolators=list(pod.manifest.isolators),
        volumes=list(pod.manifest.volumes), network=network, pod_uuid=args.uuid,
        on_started=started, on_exited=exited, stop_on_failure=True)
    pod.record(paths.pods_dir() / args.uuid)
    return run_pod(apps, options)
