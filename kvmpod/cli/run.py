"""`kvmpod run`: rkt's command line (pod flags, then IMAGE [app flags] [-- ARGS] [--- IMAGE2 ...])."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvmpod.cli.types import env_pair
from kvmpod.cli.types import KvmpodParser as _Parser
from kvmpod.errors import UsageError

APP_SEPARATOR = "---"


def _app_parser() -> _Parser:
    """Per-app flags: they follow the image they apply to."""
    p = _Parser(prog="kvmpod run IMAGE", add_help=False)
    p.add_argument("--exec", metavar="PATH", help="run PATH instead of the image's app.exec[0]")
    p.add_argument("--set-env", action="append", type=env_pair, default=[], metavar="NAME=VALUE")
    p.add_argument("--user", help="user name or number (names resolve in the image's /etc/passwd)")
    p.add_argument("--group", help="group name or number (names resolve in the image's /etc/group)")
    p.add_argument("--working-dir", metavar="DIR", help="absolute working directory in the app's rootfs")
    p.add_argument("--name", help="the app's name in the pod (default: from the image name)")
    p.add_argument("--readonly-rootfs", action="store_true", help="mount the app's rootfs read-only")
    p.add_argument("--mount", action="append", default=[], metavar="volume=NAME,target=PATH",
                   help="mount the pod volume NAME at PATH in this app (docs/volumes.md)")
    return p


def app_flag_names() -> set[str]:
    return {flag for action in _app_parser()._actions for flag in action.option_strings}


def _parse_apps(words: list[str], image: str) -> list:
    """Split `IMAGE [app flags] [-- ARGS] [--- IMAGE2 ...]` into one AppOverrides per image."""
    from kvmpod.pod.spec import AppOverrides
    from kvmpod.pod.volumes import parse_mount

    segments: list[list[str]] = [[]]
    for word in words:
        if word == APP_SEPARATOR:
            segments.append([])
        else:
            segments[-1].append(word)
    apps = []
    parser = _app_parser()
    for index, segment in enumerate(segments):
        if index > 0:
            if not segment or segment[0].startswith("-"):
                raise UsageError(f"run: an image must follow {APP_SEPARATOR}")
            image, segment = segment[0], segment[1:]
        args = None
        if "--" in segment:
            cut = segment.index("--")
            segment, args = segment[:cut], segment[cut + 1:]
        ns = parser.parse_args(segment)
        apps.append(AppOverrides(image=image, exec=ns.exec, args=args, env=dict(ns.set_env), user=ns.user,
                                 group=ns.group, working_dir=ns.working_dir, name=ns.name,
                                 readonly_rootfs=ns.readonly_rootfs, mounts=[parse_mount(m) for m in ns.mount]))
    return apps


def _unique_annotations(pairs: list[tuple[str, str]]) -> dict[str, str]:
    annotations: dict[str, str] = {}
    for name, value in pairs:
        if name in annotations:
            raise UsageError(f"--annotation: {name!r} is given twice (annotation names are unique)")
        annotations[name] = value
    return annotations


def cmd_run(ns: argparse.Namespace) -> int:
    from kvmpod.pod.launch import RunOptions, run

    from kvmpod.pod.volumes import parse_volume

    from kvmpod.net.spec import request as net_request

    annotations = _unique_annotations(ns.annotation)
    volumes = [parse_volume(v) for v in ns.volume]
    port_flags = list(ns.port)
    pod_isolators: list = []  # a pod manifest's own isolators (kvmpod/image/manifest.py Isolator)
    if ns.pod_manifest:
        from kvmpod.pod.podmanifest import read_pod_manifest

        if ns.image is not None or ns.app_words:
            raise UsageError("run: --pod-manifest takes no IMAGE, app flags or arguments (the manifest has the apps)")
        pod = read_pod_manifest(Path(ns.pod_manifest))
        apps = pod.app_overrides()
        annotations = {**pod.annotations, **annotations}  # --annotation overrides the manifest's value
        pod_isolators = pod.isolators
        volumes = [*pod.volumes, *volumes]
        port_flags = [f"{p.name}:{p.host_ip + ':' if p.host_ip else ''}{p.host_port}" for p in pod.ports] + port_flags
    elif ns.image is None:
        raise UsageError("run: give an IMAGE or --pod-manifest FILE")
    else:
        apps = _parse_apps(ns.app_words, ns.image)
    network = net_request(ns.net, port_flags, ns.dns, ns.dns_search, ns.dns_opt, ns.hosts_entry)
    if ns.interactive and len(apps) != 1:
        raise UsageError("run: --interactive needs exactly one app")
    if ns.interactive and ns.detach:
        raise UsageError("run: --interactive and --detach exclude each other (use kvmpod enter)")
    options = RunOptions(memory_mib=ns.memory, cpus=ns.cpus, kernel=ns.kernel, accel=ns.accel,
                         agent_transport=ns.agent_transport, boot=ns.boot, debug=ns.debug,
                         interactive=ns.interactive, keep=ns.keep, boot_timeout=ns.boot_timeout,
                         pod_env=dict(ns.set_env), kernel_args=ns.kernel_arg, detach=ns.detach,
                         hostname=ns.hostname, annotations=annotations, pod_isolators=pod_isolators,
                         uuid_file=ns.uuid_file_save, volumes=volumes, network=network)
    return run(apps, options)


