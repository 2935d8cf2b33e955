#!/usr/bin/env python3
"""Start per path users run: `kvmpod run /bin/true` with each network and agent transport, from its boot
snapshot and booted cold, next to the cold floor (bare QEMU), measured in the same run, interleaved.

Paths: `--net none` (the README's headline), `--net user` (the default without root), `--net default`
(the bridge, root's default: run inside a network namespace this bench makes, so no bridge, tap or
nft rule touches the machine's own namespace), and `--agent-transport vsock-user` (boots cold: QEMU
7.2 cannot save a vhost-user device). Host volumes are section 14 (bench/volumes.py).
docs/performance.md ("The default paths").

Usage: bench/paths.py [--runs N]   (prints a table; not a test, asserts nothing)
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, bench_env, floor_vm, section_main, stats, target, timed  # noqa: E402

START_LIMIT = 1.15   # a pod with a network starts within 15 % of one without (both from snapshots)
PATHS = {            # name: (label, kvmpod run flags, in the bench's netns)
    "none": ("--net none (snapshot)", ("--net", "none"), False),
    "none-cold": ("--net none --boot cold", ("--net", "none", "--boot", "cold"), False),
    "user": ("--net user (snapshot)", ("--net", "user"), False),
    "user-cold": ("--net user --boot cold", ("--net", "user", "--boot", "cold"), False),
    "default": ("--net default (snapshot)", ("--net", "default"), True),
    "default-cold": ("--net default --boot cold", ("--net", "default", "--boot", "cold"), True),
    "vsock-user": ("--agent-transport vsock-user (cold)", ("--net", "none", "--agent-transport", "vsock-user"),
                   False),
}


def measure_paths(work: Path, aci: Path, runs: int) -> dict:
    env = bench_env(work)
    floor = floor_vm(work)
    names = [n for n in PATHS if not PATHS[n][2] or os.geteuid() == 0]   # the bridge needs root
    netns = f"kvmpod-bench-{uuid.uuid4().hex[:8]}"
    if any(PATHS[n][2] for n in names):
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    try:
        argvs = {n: [*(["ip", "netns", "exec", netns] if PATHS[n][2] else []), *KVMPOD, "run", *PATHS[n][1],
                     str(aci)] for n in names}
        for argv in argvs.values():   # warm: image disk, store, a boot snapshot per shape
            timed(argv, env=env)
            timed(argv, env=env)
        samples: dict[str, list[float]] = {"floor": [], **{n: [] for n in names}}
        for _ in range(runs):
            samples["floor"].append(timed(floor.argv))
            for n in names:
                samples[n].append(timed(argvs[n], env=env))
    finally:
        if any(PATHS[n][2] for n in names):
            subprocess.run(["ip", "netns", "exec", netns, *KVMPOD, "gc"], env=env, capture_output=True)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    start = {n: stats(v) for n, v in samples.items()}
    none = start["none"]["median"]
    targets = []
    for n in ("user", "default"):
        if n in start:
            ratio = start[n]["median"] / none
            targets.append(target(f"start, --net {n} (snapshot) vs --net none", ratio, START_LIMIT,
                                  note="" if ratio <= START_LIMIT else
                                  "the interface set up by the agent after the restore, and the host's "
                                  + ("slirp netdev" if n == "user" else "tap, bridge port and lease")))
    return {"runs": runs, "labels": {n: PATHS[n][0] for n in names}, "start": start, "start_s": samples,
            "targets": targets}


def print_paths(result: dict) -> None:
    start = result["start"]
    floor, none = start["floor"]["median"], start["none"]["median"]
    print(f"kvmpod run /bin/true, {result['runs']} runs each, interleaved")
    print(f"{'':38}{'min':>8}{'median':>9}{'/floor':>8}{'/none':>8}")
    print(f"{'cold floor (bare QEMU)':38}{start['floor']['min']:8.3f}{floor:9.3f}{1:8.2f}{floor / none:8.2f}")
    for n, label in result["labels"].items():
        s = start[n]
        print(f"{label:38}{s['min']:8.3f}{s['median']:9.3f}{s['median'] / floor:8.2f}{s['median'] / none:8.2f}")


if __name__ == "__main__":
    raise SystemExit(section_main(__doc__, measure_paths, print_paths, runs=10))
