"""The `kvmpod` command line (rkt's syntax). Heavy modules are imported inside the commands,
so `kvmpod --help` starts fast."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from kvmpod import __version__
from kvmpod.errors import EXIT_KVMPOD_FAILURE, KvmpodError, UsageError

APP_SEPARATOR = "---"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are KvmpodErrors: one line, exit code 125."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _memory_mib(text: str) -> int:
    units = {"": 1, "m": 1, "mi": 1, "mib": 1, "g": 1024, "gi": 1024, "gib": 1024}
    number = text.rstrip("gGmMiIbB")
    unit = text[len(number):].lower()
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size like 256M or 1G")
    mib = int(number) * units[unit]
    if mib < 64:
        raise argparse.ArgumentTypeError(f"{text}: a pod needs at least 64 MiB")
    return mib


def _app_parser() -> _Parser:
    """Per-app flags: they follow the image they apply to."""
    p = _Parser(prog="kvmpod run IMAGE", add_help=False)
    p.add_argument("--exec", metavar="PATH", help="run PATH instead of the image's app.exec[0]")
    p.add_argument("--set-env", action="append", type=_env_pair, default=[], metavar="NAME=VALUE")
    p.add_argument("--user", help="user name or number (names resolve in the image's /etc/passwd)")
    p.add_argument("--group", help="group name or number (names resolve in the image's /etc/group)")
    p.add_argument("--working-dir", metavar="DIR", help="absolute working directory in the app's rootfs")
    p.add_argument("--name", help="the app's name in the pod (default: from the image name)")
    p.add_argument("--readonly-rootfs", action="store_true", help="mount the app's rootfs read-only")
    return p


def _parse_apps(words: list[str], image: str) -> list:
    """Split `IMAGE [app flags] [-- ARGS] [--- IMAGE2 ...]` into one AppOverrides per image."""
    from kvmpod.pod.spec import AppOverrides

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
                                 readonly_rootfs=ns.readonly_rootfs))
    return apps


def cmd_run(ns: argparse.Namespace) -> int:
    from kvmpod.pod.run import RunOptions, run

    apps = _parse_apps(ns.app_words, ns.image)
    if ns.interactive and len(apps) != 1:
        raise UsageError("run: --interactive needs exactly one app")
    options = RunOptions(memory_mib=ns.memory, cpus=ns.cpus, kernel=ns.kernel, accel=ns.accel, debug=ns.debug,
                         interactive=ns.interactive, keep=ns.keep, boot_timeout=ns.boot_timeout,
                         pod_env=dict(ns.set_env), kernel_args=ns.kernel_arg)
    return run(apps, options)


def cmd_image_build(ns: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from kvmpod.image.build import build_aci
    from kvmpod.image.manifest import build_manifest

    try:
        exec_ = shlex.split(ns.exec)
    except ValueError as e:
        raise UsageError(f"--exec: {e}") from None
    manifest = build_manifest(ns.name, exec_=exec_, user=ns.user, group=ns.group,
                              working_directory=ns.working_dir, environment=dict(ns.env),
                              labels=dict(ns.label), annotations=dict(ns.annotation))
    build_aci(Path(ns.rootfs), manifest, Path(ns.output), ns.compression)
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    import json

    from kvmpod.pod.registry import list_pods

    pods = [p.summary() for p in list_pods()]
    if ns.json:
        print(json.dumps(pods, indent=2))
        return 0
    print(f"{'UUID':36}  {'STATE':9}  APPS")
    for pod in pods:
        apps = ", ".join(a.get("name", "?") for a in pod["apps"])
        print(f"{pod['uuid']:36}  {pod['state']:9}  {apps}")
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    import json

    from kvmpod.pod.registry import find_pod

    pod = find_pod(ns.uuid)
    summary = {**pod.summary(), "timings": pod.state.get("timings", {})}
    if ns.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"uuid:  {summary['uuid']}\nstate: {summary['state']}\npath:  {summary['path']}")
    for app in summary["apps"]:
        print(f"app {app.get('name')}: {app.get('exit', 'running')} (image {app.get('image', '?')[:19]}…)")
    return 0


def cmd_gc(ns: argparse.Namespace) -> int:
    from kvmpod.pod.registry import gc

    for uuid in gc(ns.grace_period):
        print(f"removed pod {uuid}")
    return 0


def build_parser() -> _Parser:
    parser = _Parser(prog="kvmpod", description="Run App Container images, each in its own lightweight VM.")
    parser.add_argument("--version", action="version", version=f"kvmpod {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run", help="run an image in a new pod (VM)",
        usage="kvmpod run [pod flags] IMAGE [--exec PATH] [app flags] [-- ARGS...] [--- IMAGE2 ...]",
        description="Boot a VM, run the image's app in it, relay its output; exit with the app's exit "
                    "code (128+N if killed by signal N, 125 if kvmpod itself failed, 126/127 if the exec "
                    "path cannot be run / does not exist). App flags (after IMAGE): --exec, --set-env, "
                    "--user, --group, --working-dir, --name, --readonly-rootfs.")
    run.add_argument("--memory", type=_memory_mib, default=256, metavar="SIZE", help="guest memory (default 256M)")
    run.add_argument("--cpus", type=_positive_int, default=1, help="guest vCPUs (default 1)")
    run.add_argument("--kernel", metavar="PATH", help="guest kernel image or kernel dir (see docs/kernel.md)")
    run.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                     help="accelerator (auto: KVM where it can run a standard guest, else TCG)")
    run.add_argument("--interactive", "-i", action="store_true", help="forward stdin to the app")
    run.add_argument("--set-env", action="append", type=_env_pair, default=[], metavar="NAME=VALUE",
                     help="environment for every app of the pod")
    run.add_argument("--keep", action="store_true", help="keep the pod directory after the pod ends")
    run.add_argument("--boot-timeout", type=float, default=60.0, metavar="S",
                     help="seconds the guest may take to boot its agent (default 60)")
    run.add_argument("--kernel-arg", action="append", default=[], metavar="ARG",
                     help="append ARG to the guest kernel command line (debugging)")
    run.add_argument("--debug", action="store_true", help="show what kvmpod does, the agent's log and the console")
    run.add_argument("image", metavar="IMAGE", help="path of an ACI file")
    run.add_argument("app_words", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="list the pods on this host")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)
    status = sub.add_parser("status", help="show one pod (a unique UUID prefix is enough)")
    status.add_argument("uuid", metavar="UUID")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    gcp = sub.add_parser("gc", help="remove pods whose kvmpod process is gone (and any QEMU they left)")
    gcp.add_argument("--grace-period", type=float, default=0.0, metavar="S",
                     help="keep pods that ended less than S seconds ago (default 0)")
    gcp.set_defaults(func=cmd_gc)

    image = sub.add_parser("image", help="build and manage images")
    image_sub = image.add_subparsers(dest="image_command", metavar="COMMAND", parser_class=_Parser)
    build = image_sub.add_parser("build", help="build an ACI from a directory tree (like actool build)")
    build.add_argument("--rootfs", required=True, metavar="DIR", help="directory that becomes rootfs/")
    build.add_argument("--name", required=True, help="image name (an AC Identifier, e.g. example.com/app)")
    build.add_argument("--exec", required=True, metavar="CMD", help="app command line (split like a shell)")
    build.add_argument("--user", default="0")
    build.add_argument("--group", default="0")
    build.add_argument("--working-dir", metavar="DIR")
    build.add_argument("--env", action="append", type=_env_pair, default=[], metavar="NAME=VALUE")
    build.add_argument("--label", action="append", type=_env_pair, default=[], metavar="NAME=VALUE",
                       help="image label (os=linux and arch=amd64 are set unless given)")
    build.add_argument("--annotation", action="append", type=_env_pair, default=[], metavar="NAME=VALUE")
    build.add_argument("--compression", choices=["gzip", "none", "bzip2", "xz"], default="gzip")
    build.add_argument("-o", "--output", required=True, metavar="OUT.aci")
    build.set_defaults(func=cmd_image_build)
    image.set_defaults(func=lambda ns: (image.print_help(), 2)[1])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        if not getattr(ns, "func", None):
            parser.print_help()
            return 2
        debug = getattr(ns, "debug", False)
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="kvmpod: %(message)s")
        if not debug:
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # its noise is ours to explain
        return ns.func(ns)
    except KvmpodError as e:
        print(f"kvmpod: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kvmpod: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_KVMPOD_FAILURE
    except Exception as e:  # a bug: one line for users, the traceback with --debug
        if getattr(locals().get("ns"), "debug", False):
            raise
        print(f"kvmpod: internal error: {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
        return EXIT_KVMPOD_FAILURE
