"""`kvmpod run`: its words split into pods and apps (run_words.py), the pod's options, and the pod run
in this process (kvmpod/pod/entry.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvmpod.cli.run_words import APP_SEPARATOR, app_parser, takes_value
from kvmpod.errors import UsageError
from kvmpod.image.manifest import Isolator
from kvmpod.image.transfer import Transfer
from kvmpod.net.spec import request as net_request
from kvmpod.pod.entry import run
from kvmpod.pod.options import RunOptions
from kvmpod.pod.podmanifest import read_pod_manifest
from kvmpod.pod.spec import AppOverrides
from kvmpod.pod.volumes import parse_mount, parse_volume


def _parse_apps(words: list[str], image: str, pod_flags: frozenset[str] = frozenset()) -> list[AppOverrides]:
    """Split `IMAGE [app flags] [-- ARGS] [---] [IMAGE2 [app flags] ...]` into one AppOverrides per
    image, as rkt does: a word that is neither an app flag nor its value starts the next image; after
    `-- ARGS` only `---` does (the arguments run until it)."""
    parser = app_parser()
    flag_takes_value = takes_value(parser)
    segments: list[tuple[str, list[str], list[str] | None]] = []
    current: tuple[str, list[str], list[str] | None] = (image, [], None)
    i = 0
    while i < len(words):
        word = words[i]
        if word == APP_SEPARATOR:
            segments.append(current)
            if i + 1 >= len(words) or words[i + 1].startswith("-"):
                raise UsageError(f"run: an image must follow {APP_SEPARATOR}")
            current = (words[i + 1], [], None)
            i += 2
        elif word == "--":
            end = words.index(APP_SEPARATOR, i + 1) if APP_SEPARATOR in words[i + 1:] else len(words)
            current = (current[0], current[1], words[i + 1:end])
            i = end
        elif word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            if name not in flag_takes_value:
                where = "a pod flag: it goes before the first IMAGE" if name in pod_flags else "not an app flag"
                raise UsageError(f"run: {name} (after {current[0]}) is {where}")
            value = [words[i + 1]] if flag_takes_value[name] and "=" not in word and i + 1 < len(words) else []
            current[1].extend([word, *value])
            i += 1 + len(value)
        else:  # rkt's `run IMG1 IMG2`: the next image
            segments.append(current)
            current = (word, [], None)
            i += 1
    segments.append(current)
    apps = []
    for image_word, flags, args in segments:
        ns = parser.parse_args(flags)
        apps.append(AppOverrides(image=image_word, exec=ns.exec, args=args, env=dict(ns.set_env), user=ns.user,
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
    annotations = _unique_annotations(ns.annotation)
    volumes = [parse_volume(v) for v in ns.volume]
    port_flags = list(ns.port)
    pod_isolators: list[Isolator] = []  # a pod manifest's own isolators
    if ns.pod_manifest:
        if ns.image is not None or ns.app_words:
            raise UsageError("run: --pod-manifest takes no IMAGE, app flags or arguments (the manifest has the apps)")
        pod = read_pod_manifest(Path(ns.pod_manifest))
        apps = pod.app_overrides()
        annotations = {**pod.annotations, **annotations}  # --annotation overrides the manifest's value
        pod_isolators = pod.isolators
        volumes = [*pod.volumes, *volumes]
        port_flags = [f"{p.name}:{p.host_ip + ':' if p.host_ip else ''}{p.host_port}" for p in pod.ports] + port_flags
    elif ns.image is None and ns.app_words:
        raise UsageError(f"run: {ns.app_words[0]} must follow an IMAGE")
    elif ns.image is None:
        raise UsageError("run: give an IMAGE or --pod-manifest FILE")
    else:
        apps = _parse_apps(ns.app_words, ns.image, getattr(ns, "pod_flags", frozenset()))
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
                         uuid_file=ns.uuid_file_save, volumes=volumes, network=network, timeout=ns.timeout,
                         transfer=Transfer.from_flags(ns.insecure_options, ns.ca_file),
                         backend=ns.backend, libvirt_uri=ns.libvirt_uri)
    return run(apps, options)


