"""The `kvmpod` command line's grammar (rkt's syntax): every command and flag, nothing that runs one.

A command's function is named here as "MODULE:FUNCTION" of kvmpod/cli/, and only the command that
runs is imported (kvmpod/cli/__init__.py): `kvmpod --help`, `kvmpod list` and the completion scripts
never load the pod runtime, the image store or the VM launcher.
"""

from __future__ import annotations

import argparse

from kvmpod.cli.run_words import split_run_words
from kvmpod.cli.types import KvmpodParser, annotation, duration, env_pair, hostname, memory_mib, positive_int
from kvmpod.version import __version__


def _transfer_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that may download an image (kvmpod/image/transfer.py)."""
    # read by kvmpod/image/transfer.py's Transfer.from_flags: the grammar loads no dataclass
    parser.add_argument("--insecure-options", default="", metavar="OPTS",
                        help="skip checks for this command, comma-separated: image (signature policy), "
                             "http (allow plain http), tls (unverified certificates), pubkey, all")
    parser.add_argument("--ca-file", metavar="FILE",
                        help="extra CA certificates (PEM) trusted for https downloads")


def build_parser() -> KvmpodParser:
    parser = KvmpodParser(prog="kvmpod", description="Run App Container images, each in its own lightweight VM.")
    parser.add_argument("--version", action="version", version=f"kvmpod {__version__}")
    parser.add_argument("--dir", metavar="DIR", help="image store directory (default /var/lib/kvmpod as root, "
                        "else ~/.local/share/kvmpod; docs/store.md)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=KvmpodParser)

    run = sub.add_parser(
        "run", help="run an image in a new pod (VM)",
        usage="kvmpod run [pod flags] IMAGE [--exec PATH] [app flags] [-- ARGS... ---] [IMAGE2 ...]\n"
              "       kvmpod run [pod flags] --pod-manifest FILE",
        description="Boot a VM, run the image's app in it, relay its output; exit with the app's exit "
                    "code (128+N if killed by signal N, 125 if kvmpod itself failed, 126/127 if the exec "
                    "path cannot be run / does not exist). App flags (after IMAGE): --exec, --set-env, "
                    "--user, --group, --working-dir, --name, --readonly-rootfs.")
    run.add_argument("--memory", type=memory_mib, metavar="SIZE",
                     help="guest memory (default: from the apps' resource/memory limits, else 256M)")
    run.add_argument("--cpus", type=positive_int,
                     help="guest vCPUs (default: from the apps' resource/cpu limits, else 1)")
    run.add_argument("--hostname", type=hostname, help="the pod's hostname (default kvmpod-<UUID prefix>)")
    run.add_argument("--annotation", action="append", type=annotation, default=[], metavar="NAME=VALUE",
                     help="pod annotation (served by the metadata service at /pod/annotations)")
    run.add_argument("--volume", action="append", default=[], metavar="NAME,kind=host|empty,...",
                     help="a pod volume: NAME,kind=host,source=/abs/dir[,readOnly=true][,owner=source|UID:GID] or "
                          "NAME,kind=empty[,mode=0755,uid=0,gid=0] (docs/volumes.md)")
    run.add_argument("--net", metavar="NET",
                     help="none | user (QEMU user-mode, the default when not root) | default (bridge kvmpod0 "
                          "with NAT, the default for root) | NAME[,NAME2] (CNI networks) (docs/networking.md)")
    run.add_argument("--port", action="append", default=[], metavar="NAME:[HOSTIP:]HOSTPORT",
                     help="forward host port HOSTPORT to the app port NAME (repeatable)")
    run.add_argument("--dns", action="append", default=[], metavar="ADDRESS",
                     help="nameserver for the apps' /etc/resolv.conf (repeatable), or host (the host's "
                          "resolvers, the default) or none (keep the images' own file)")
    run.add_argument("--dns-search", action="append", default=[], metavar="DOMAIN", help="resolv.conf search domain")
    run.add_argument("--dns-opt", action="append", default=[], metavar="OPTION", help="resolv.conf option (e.g. ndots:2)")
    run.add_argument("--hosts-entry", action="append", default=[], metavar="IP=HOSTNAME",
                     help="an /etc/hosts entry for every app (repeatable), or host (copy the host's /etc/hosts)")
    run.add_argument("--uuid-file-save", metavar="FILE", help="write the pod's UUID to FILE")
    run.add_argument("--pod-manifest", metavar="FILE",
                     help="run this appc PodManifest (its images by ID from the store) instead of IMAGE ...")
    run.add_argument("--kernel", metavar="PATH", help="guest kernel image or kernel dir (see docs/kernel.md)")
    run.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                     help="accelerator (auto: KVM where it can run a standard guest, else TCG)")
    run.add_argument("--agent-transport", choices=["auto", "vsock", "vhost-vsock", "vsock-user", "serial"],
                     default="auto", metavar="T",
                     help="how kvmpod reaches the guest agent: auto (default: serial for a pod started from a "
                          "boot snapshot, else vsock: kernel vhost-vsock where /dev/vhost-vsock is usable, else "
                          "kvmpod's userspace backend), vsock, vhost-vsock, vsock-user, serial (virtio-serial)")
    run.add_argument("--backend", choices=["qemu", "libvirt"], default=None,
                     help="VM backend: qemu (default, [vm] backend in kvmpod.toml) spawns QEMU itself; libvirt "
                          "runs the pod as a transient libvirt domain (docs/libvirt.md)")
    run.add_argument("--libvirt-uri", metavar="URI", default=None,
                     help="libvirt connection for --backend libvirt ([vm] libvirt-uri; default qemu:///system "
                          "as root, qemu:///session otherwise)")
    run.add_argument("--boot", choices=["snapshot", "cold"], default=None,
                     help="snapshot (default, [run] boot in kvmpod.toml): restore a VM booted once and saved, "
                          "made the first time it is needed, where the pod allows (no vsock transport or virtio-fs "
                          "host volume); cold: boot the guest kernel (docs/snapshot.md)")
    run.add_argument("--interactive", "-i", action="store_true",
                     help="forward stdin to the app (a terminal: the app gets a pty, raw mode here)")
    run.add_argument("--detach", "-d", action="store_true",
                     help="print the pod's UUID and return once its apps run; their output goes to "
                          "`kvmpod logs`")
    run.add_argument("--set-env", action="append", type=env_pair, default=[], metavar="NAME=VALUE",
                     help="environment for every app of the pod")
    run.add_argument("--keep", action="store_true", help="keep the pod directory after the pod ends")
    run.add_argument("--timeout", type=duration, metavar="DURATION",
                     help="stop the pod when its apps run longer than DURATION (e.g. 90s, 30m, 1h30m; counted "
                          "from their start) and exit with status 124 (docs/ci.md)")
    run.add_argument("--boot-timeout", type=float, default=60.0, metavar="S",
                     help="seconds the guest may take to boot its agent (default 60)")
    run.add_argument("--kernel-arg", action="append", default=[], metavar="ARG",
                     help="append ARG to the guest kernel command line (debugging)")
    run.add_argument("--debug", action="store_true", help="show what kvmpod does, the agent's log and the console")
    _transfer_flags(run)
    run.add_argument("image", metavar="IMAGE", nargs="?",
                     help="an ACI file or URL, docker-archive:FILE, oci-archive:FILE, oci:DIR[:TAG], "
                          "an image ID (sha512-…) or a store name (NAME[:VERSION][,LABEL=VALUE...])")
    run.add_argument("app_words", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(func="run:cmd_run")
    parser.run_parser = run  # for the misplaced-app-flag message

    lst = sub.add_parser("list", help="list the pods on this host")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func="pods:cmd_list")
    status = sub.add_parser("status", help="show one pod (a unique UUID prefix is enough)")
    status.add_argument("uuid", metavar="UUID")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func="pods:cmd_status")
    gcp = sub.add_parser("gc", help="remove pods whose kvmpod process is gone (and any QEMU they left)")
    gcp.add_argument("--grace-period", type=float, default=0.0, metavar="S",
                     help="keep pods that ended less than S seconds ago (default 0)")
    gcp.set_defaults(func="pods:cmd_gc")

    enter = sub.add_parser(
        "enter", help="run a command in a running pod's app (a terminal if stdin is one)",
        usage="kvmpod enter UUID [--app NAME] [--set-env NAME=VALUE] [--user U] [--group G] "
              "[--working-dir DIR] [-- CMD ARGS...]",
        description="Run CMD (default /bin/sh) in an app of a running pod, in the app's root with its "
                    "environment, user and group; exit with its exit code (128+N if killed by signal N). "
                    "A command without a slash is looked up in the app's PATH.")
    enter.add_argument("uuid", metavar="UUID", help="the pod (a unique UUID prefix is enough)")
    enter.add_argument("--app", metavar="NAME", help="the app (default: the pod's only app)")
    enter.add_argument("--set-env", action="append", type=env_pair, default=[], metavar="NAME=VALUE",
                       help="environment on top of the app's")
    enter.add_argument("--user", help="user name or number (default: the app's)")
    enter.add_argument("--group", help="group name or number (default: the app's)")
    enter.add_argument("--working-dir", metavar="DIR", help="working directory (default: the app's)")
    enter.set_defaults(func="interact:cmd_enter", command=[])
    logs = sub.add_parser("logs", help="print the output of a pod run with --detach")
    logs.add_argument("uuid", metavar="UUID")
    logs.add_argument("--app", metavar="NAME", help="the app (default: the pod's only app)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the pod ends")
    logs.set_defaults(func="interact:cmd_logs")
    stop = sub.add_parser("stop", help="stop running pods: SIGTERM, then SIGKILL and power-off",
                          description="SIGTERM to every app, up to --timeout seconds for them to end, SIGKILL, "
                                      "guest power-off; returns once QEMU is gone and prints each UUID. A pod "
                                      "that has ended already is not an error.")
    stop.add_argument("uuids", nargs="+", metavar="UUID")
    stop.add_argument("--force", action="store_true", help="kill the VM at once")
    stop.add_argument("--timeout", type=float, default=10.0, metavar="S",
                      help="seconds the apps get after SIGTERM (default 10)")
    stop.set_defaults(func="interact:cmd_stop")
    rmp = sub.add_parser("rm", help="remove pods that have ended (their directories, logs included)")
    rmp.add_argument("uuids", nargs="+", metavar="UUID")
    rmp.set_defaults(func="interact:cmd_rm")

    fetch = sub.add_parser("fetch", help="import images into the store and print their IDs",
                           description="Import each SOURCE (an ACI file or http(s) URL, docker-archive:FILE, "
                                       "oci-archive:FILE or oci:DIR[:TAG], or an image name NAME[:VERSION] "
                                       "found by appc discovery unless it is in the store) and print its "
                                       "image ID.")
    fetch.add_argument("sources", nargs="+", metavar="SOURCE")
    _transfer_flags(fetch)
    fetch.set_defaults(func="images:cmd_fetch")

    image = sub.add_parser("image", help="build and manage images")
    image_sub = image.add_subparsers(dest="image_command", metavar="COMMAND", parser_class=KvmpodParser)
    build = image_sub.add_parser("build", help="build an ACI from a directory tree (like actool build)")
    build.add_argument("--rootfs", required=True, metavar="DIR", help="directory that becomes rootfs/")
    build.add_argument("--name", required=True, help="image name (an AC Identifier, e.g. example.com/app)")
    build.add_argument("--exec", required=True, metavar="CMD", help="app command line (split like a shell)")
    build.add_argument("--user", default="0")
    build.add_argument("--group", default="0")
    build.add_argument("--working-dir", metavar="DIR")
    build.add_argument("--env", action="append", type=env_pair, default=[], metavar="NAME=VALUE")
    build.add_argument("--label", action="append", type=env_pair, default=[], metavar="NAME=VALUE",
                       help="image label (os=linux and arch=amd64 are set unless given)")
    build.add_argument("--annotation", action="append", type=env_pair, default=[], metavar="NAME=VALUE")
    build.add_argument("--port", action="append", default=[], metavar="NAME:PROTOCOL:PORT[:COUNT]",
                       help="an appc port the app listens on (e.g. http:tcp:80), for run --port NAME:HOSTPORT")
    build.add_argument("--compression", choices=["gzip", "none", "bzip2", "xz"], default="gzip")
    build.add_argument("-o", "--output", required=True, metavar="OUT.aci")
    build.set_defaults(func="images:cmd_image_build")
    imp = image_sub.add_parser("import", help="import images into the store (same as `kvmpod fetch`)")
    imp.add_argument("sources", nargs="+", metavar="SOURCE")
    _transfer_flags(imp)
    imp.set_defaults(func="images:cmd_fetch")
    ls = image_sub.add_parser("list", help="list the images in the store")
    ls.add_argument("--json", action="store_true", help="everything, full IDs, as JSON")
    ls.add_argument("--no-legend", action="store_true", help="no header line")
    ls.set_defaults(func="images:cmd_image_list")
    cat = image_sub.add_parser("cat-manifest", help="print an image's manifest")
    cat.add_argument("image", metavar="IMAGE", help="image ID (a unique prefix of 12+ hex digits) or store name")
    cat.add_argument("--pretty", action="store_true", help="indent the JSON")
    cat.set_defaults(func="images:cmd_image_cat_manifest")
    export = image_sub.add_parser("export", help="write a stored image as an (uncompressed) ACI file")
    export.add_argument("image", metavar="IMAGE", help="image ID or store name")
    export.add_argument("output", metavar="OUT.aci")
    export.add_argument("--overwrite", action="store_true", help="replace OUT.aci if it exists")
    export.set_defaults(func="images:cmd_image_export")
    rm = image_sub.add_parser("rm", help="remove images (refused for images a running pod uses)")
    rm.add_argument("images", nargs="+", metavar="IMAGE", help="image ID or store name")
    rm.set_defaults(func="images:cmd_image_rm")
    igc = image_sub.add_parser("gc", help="remove rootfs disks, blobs and temp files no image references")
    igc.set_defaults(func="images:cmd_image_gc")
    fsck = image_sub.add_parser("fsck", help="check the store: blob hashes, records, disks, stamps, leftovers",
                                description="Check every blob's hash, the image records, rootfs disks, source "
                                            "stamps, temporary files and locks; print one line per problem and "
                                            "exit 1 if there is any. Safe while other kvmpod commands run.")
    fsck.add_argument("--repair", action="store_true",
                      help="also fix what loses nothing not lost already: orphans, leftovers, damaged disks")
    fsck.set_defaults(func="images:cmd_image_fsck")
    image.set_defaults(func="images:cmd_image_help", help_parser=image)

    trust = sub.add_parser(
        "trust", help="trust keys to sign images under a name prefix (rkt trust)",
        usage="kvmpod trust --prefix PREFIX [KEYFILE|URL...] | --root KEYFILE... | list [--json] | rm FINGERPRINT",
        description="Store public keys (armored or binary) trusted to sign images whose names fall under "
                    "PREFIX, or every image (--root); without key files the prefix's keys are found by appc "
                    "discovery (ac-discovery-pubkeys). Each key's fingerprint is shown and confirmed on a "
                    "terminal. Expired and revoked keys are refused. Keys live in /etc/kvmpod/trust (root) "
                    "or ~/.config/kvmpod/trust (docs/store.md, \"Trust\").")
    trust.add_argument("--prefix", metavar="PREFIX", help="trust the keys for images named PREFIX or PREFIX/...")
    trust.add_argument("--root", action="store_true", help="trust the keys for every image")
    trust.add_argument("--skip-fingerprint-review", action="store_true",
                       help="store the keys without asking (for scripts that checked the fingerprints)")
    trust.add_argument("--json", action="store_true", help="trust list: as JSON")
    _transfer_flags(trust)
    trust.add_argument("words", nargs="*", metavar="KEYFILE", help="key files or https URLs; or list, rm FINGERPRINT")
    trust.set_defaults(func="trust:cmd_trust")

    setup = sub.add_parser("setup", help="build what is per machine: the guest kernels and kvmpod's QEMU",
                           description="Build (or fetch) into the cache what kvmpod builds per machine: the "
                                       "minimal guest kernel from Debian's linux-source, the Debian cloud kernel, "
                                       "kvmpod's QEMU from Debian's qemu source. Nothing is rebuilt when an "
                                       "identical build is there (docs/install.md).")
    only = setup.add_mutually_exclusive_group()
    only.add_argument("--kernel-only", action="store_true", help="only the guest kernels")
    only.add_argument("--qemu-only", action="store_true", help="only kvmpod's QEMU")
    only.add_argument("--only", action="append", choices=["minimal-kernel", "distro-kernel", "qemu"],
                      help="only this step (repeatable)")
    setup.add_argument("--force", action="store_true", help="build even what is up to date")
    setup.add_argument("-j", "--jobs", type=positive_int, help="parallel make jobs (default: the number of CPUs)")
    setup.add_argument("--list-packages", action="store_true",
                       help="print the Debian packages the steps need, on one line, and build nothing")
    setup.set_defaults(func="setup:cmd_setup")
    doctor = sub.add_parser("doctor", help="what this host offers and what kvmpod will do with it (boots nothing)",
                            description="One line per check with its reason: the accelerator (real, nested or "
                                        "PVM-only KVM, else TCG), vhost-vsock, vhost-net, tun, virtiofsd, nftables, "
                                        "CNI, cgroups, user namespaces, root, the guest kernel and QEMU kvmpod "
                                        "would pick, its directories and their free space. Exit status 0 when "
                                        "pods can run, 1 (with the blocking lines) otherwise (docs/ci.md).")
    doctor.add_argument("--json", action="store_true", help="the same as JSON")
    doctor.set_defaults(func="doctor:cmd_doctor")
    completion = sub.add_parser("completion", help="print the shell completion script (bash or zsh)",
                                description="Print a completion script for SHELL, e.g. "
                                            "`kvmpod completion bash > /etc/bash_completion.d/kvmpod`.")
    completion.add_argument("shell", choices=["bash", "zsh"], metavar="SHELL", help="bash or zsh")
    completion.set_defaults(func="setup:cmd_completion")
    words = sub.add_parser("__complete")  # no help: hidden; what the completion scripts call
    words.add_argument("kind", choices=["pods", "images"])
    words.set_defaults(func="setup:cmd_complete_words")
    return parser


def _command_index(argv: list[str]) -> int | None:
    """Where the command is in argv: after the global flags (--dir DIR, --version, --help)."""
    i = 0
    while i < len(argv):
        if argv[i] == "--dir":
            i += 2
        elif argv[i].startswith("--dir=") or argv[i] in ("-h", "--help", "--version"):
            i += 1
        else:
            return i
    return None


def parse(parser: KvmpodParser, argv: list[str]) -> argparse.Namespace:
    """argparse, except for `run`'s words after its pod flags (IMAGE, app flags, `-- ARGS`, more
    images), which go to the run command's own parser intact (kvmpod/cli/run.py): argparse would
    swallow a `--` after IMAGE, and take an unknown pod flag's value for the IMAGE."""
    at = _command_index(argv)
    if at is not None and argv[at] == "run":
        pod_words, image, rest = split_run_words(argv[at + 1:], parser.run_parser)
        ns = parser.parse_args(argv[:at + 1] + pod_words)
        ns.image, ns.app_words = image, rest
        ns.pod_flags = frozenset(f for action in parser.run_parser._actions for f in action.option_strings)
        return ns
    if "enter" in argv and "--" in argv[argv.index("enter"):]:  # enter's command, likewise
        cut = argv.index("--", argv.index("enter"))
        ns = parser.parse_args(argv[:cut])
        if getattr(ns, "func", None) == "interact:cmd_enter":
            ns.command = argv[cut + 1:]
            return ns
    return parser.parse_args(argv)
