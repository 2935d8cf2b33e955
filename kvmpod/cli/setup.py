"""`kvmpod setup` (the per-machine builds, kvmpod/provision.py) and `kvmpod completion` (the shell scripts,
kvmpod/completion.py)."""

from __future__ import annotations

import argparse
import sys

from kvmpod import provision
from kvmpod.cli.parser import build_parser
from kvmpod.completion import dynamic_words, script


def cmd_setup(ns: argparse.Namespace) -> int:
    if ns.only:
        names = list(dict.fromkeys(ns.only))
    elif ns.kernel_only:
        names = list(provision.KERNEL_STEPS)
    elif ns.qemu_only:
        names = ["qemu"]
    else:
        names = list(provision.STEP_NAMES)
    if ns.list_packages:  # e.g. apt-get install $(kvmpod setup --list-packages)
        print(" ".join(dict.fromkeys(p for step in provision.steps() if step.name in names for p in step.packages)))
        return 0
    for name, path in provision.check_programs():
        print(f"{name}: {path}")
    if "qemu" in names and (user := provision.qemu_user()):
        print(f"QEMU's user: {user}")
    reuse = provision.reusable_caches()
    print(f"cache: {provision.own_cache()}" + (f" (builds in {', '.join(map(str, reuse))} count too)" if reuse else ""))
    results = provision.run_steps(names, force=ns.force, jobs=ns.jobs)
    built = [r.step for r in results if r.built]
    total = sum(r.seconds for r in results)
    print(f"kvmpod setup: {'built ' + ', '.join(built) if built else 'everything was up to date'} "
          f"({total:.1f} s)")
    return 0


def cmd_completion(ns: argparse.Namespace) -> int:
    sys.stdout.write(script(build_parser(), ns.shell))
    return 0


def cmd_complete_words(ns: argparse.Namespace) -> int:
    """The dynamic words the completion scripts ask for: pod UUIDs, image names."""

    for word in dynamic_words(ns.kind):
        print(word)
    return 0
