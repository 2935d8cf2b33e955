#!/usr/bin/env python3
"""Host volumes: start and throughput per transport, each against a baseline measured in the same run.

Start: `kvmpod run` of /bin/true with one host volume mounted, over virtio-9p (from its boot snapshot:
QEMU 7.2 saves a 9p device the guest has not mounted) and over virtio-fs (the default as root: it
boots cold, vhost-user-fs being unmigratable), against the same pod without a volume (from its
snapshot), interleaved. Throughput: in one pod per transport, a host volume against a kind=empty one
(tmpfs in the guest): write a file of SIZE MiB with fsync, read it back, create and stat N small files,
remove them, timed by the guest (/proc/uptime, 10 ms resolution), so the ratio is what the transport
costs. Needs root (virtiofsd). docs/performance.md ("The default paths").

Usage: bench/volumes.py [--runs N]   (prints tables; not a test, asserts nothing)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, Unavailable, bench_env, section_main, stats, target, timed  # noqa: E402

SIZE_MIB, FILES = 16, 200
START_LIMIT = 1.15   # a pod with a host volume starts within 15 % of one without (both from snapshots)

WORKLOAD = r'''
t() { read u _ < /proc/uptime; echo $(( ${u%.*} * 100 + 1${u#*.} - 100 )); }
for d in /empty /host; do
  a=$(t); dd if=/dev/zero of=$d/big bs=1M count={size} conv=fsync 2>/dev/null; b=$(t)
  cat $d/big > /dev/null; c=$(t)
  i=0; while [ $i -lt {files} ]; do echo x > $d/f$i; i=$((i+1)); done; ls -l $d > /dev/null; e=$(t)
  rm -f $d/f* $d/big; g=$(t)
  echo "$d write $((b-a)) read $((c-b)) create $((e-c)) remove $((g-e))"
done
'''


def run_pod(env: dict[str, str], aci: Path, share: Path, transport: str, size: int, files: int) -> dict:
    """The throughput workload in one pod: {"/empty": {op: ms}, "/host": {op: ms}}."""
    script = WORKLOAD.replace("{size}", str(size)).replace("{files}", str(files))
    out = subprocess.run(
        [*KVMPOD, "run", "--memory", f"{256 + 2 * size}M", "--volume", "empty,kind=empty",
         "--volume", f"host,kind=host,source={share}", str(aci), "--mount", "volume=empty,target=/empty",
         "--mount", "volume=host,target=/host", "--exec", "/bin/sh", "--", "-c", script],
        env={**env, "KVMPOD_VOLUME_TRANSPORT": transport}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"kvmpod run failed ({transport}): {out.stderr.strip()}")
    result = {}
    for line in out.stdout.splitlines():
        words = line.split()
        result[words[0]] = {k: int(v) * 10 for k, v in zip(words[1::2], words[2::2])}  # centiseconds -> ms
    return result


def measure_volumes(work: Path, aci: Path, runs: int) -> dict:
    if os.geteuid() != 0:
        raise Unavailable("needs root (virtiofsd)")
    env = bench_env(work)
    share = work / "volume-share"
    share.mkdir(exist_ok=True)
    base = [*KVMPOD, "run", str(aci)]
    with_volume = [*KVMPOD, "run", "--volume", f"h,kind=host,source={share}", str(aci),
                   "--mount", "volume=h,target=/h"]
    argvs = {"none": (base, env), "9p": (with_volume, {**env, "KVMPOD_VOLUME_TRANSPORT": "9p"}),
             "virtiofs": (with_volume, {**env, "KVMPOD_VOLUME_TRANSPORT": "virtiofs"})}
    for argv, e in argvs.values():  # warm: image disk, store, boot snapshots made
        timed(argv, env=e)
        timed(argv, env=e)
    samples: dict[str, list[float]] = {name: [] for name in argvs}
    for _ in range(runs):
        for name, (argv, e) in argvs.items():
            samples[name].append(timed(argv, env=e))
    throughput = {t: run_pod(env, aci, share, t, SIZE_MIB, FILES) for t in ("virtiofs", "9p")}
    start = {name: stats(values) for name, values in samples.items()}
    none = start["none"]["median"]
    nine, virtiofs = start["9p"]["median"] / none, start["virtiofs"]["median"] / none
    return {
        "runs": runs, "start": start, "start_s": samples, "throughput_ms": throughput,
        "size_mib": SIZE_MIB, "files": FILES,
        "targets": [
            target("start, a 9p host volume (snapshot) vs none", nine, START_LIMIT,
                   note="" if nine <= START_LIMIT else "the 9p mount and bind at START, under TCG"),
            target("start, a virtio-fs host volume (root's default) vs none", virtiofs, START_LIMIT,
                   note="" if virtiofs <= START_LIMIT else
                   "boots cold: QEMU 7.2's vhost-user-fs is unmigratable and needs shared guest RAM; "
                   "[run] volume-transport = \"9p\" starts from a snapshot"),
        ],
    }


def print_volumes(result: dict) -> None:
    start = result["start"]
    none = start["none"]["median"]
    print(f"start, {result['runs']} runs each, interleaved{'':6}{'min':>8}{'median':>9}{'ratio':>8}")
    for name, label in (("none", "no volume (snapshot)"), ("9p", "host volume, 9p (snapshot)"),
                        ("virtiofs", "host volume, virtio-fs (cold)")):
        s = start[name]
        print(f"{label:40}{s['min']:8.3f}{s['median']:9.3f}{s['median'] / none:8.2f}")
    print(f"\nthroughput, {result['size_mib']} MiB and {result['files']} files, guest-timed")
    print(f"{'transport':10}{'op':8}{'tmpfs ms':>10}{'host ms':>10}{'ratio':>8}")
    for transport, r in result["throughput_ms"].items():
        for op, base in r["/empty"].items():
            host = r["/host"][op]
            print(f"{transport:10}{op:8}{base:10d}{host:10d}{host / max(base, 10):8.1f}")


if __name__ == "__main__":
    raise SystemExit(section_main(__doc__, measure_volumes, print_volumes, runs=5))
