#!/usr/bin/env python3
"""Volume throughput benchmark: a host volume (virtio-fs, then virtio-9p) against a kind=empty volume
(tmpfs in the guest) measured in the same pod, so the ratio is what the transport costs.

Inside the guest: write a file of SIZE MiB with fsync, read it back, create and stat N small files,
remove them. Timed by the guest (/proc/uptime, 10 ms resolution). Needs root (virtiofsd).

Usage: bench/volumes.py [--size MIB] [--files N]   (prints a table; not a test, asserts nothing)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, bench_env, build_busybox_aci  # noqa: E402

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
    script = WORKLOAD.replace("{size}", str(size)).replace("{files}", str(files))
    out = subprocess.run(
        [*KVMPOD, "run", "--memory", f"{256 + 2 * size}M", "--volume", "empty,kind=empty",
         "--volume", f"host,kind=host,source={share}", str(aci), "--mount", "volume=empty,target=/empty",
         "--mount", "volume=host,target=/host", "--exec", "/bin/sh", "--", "-c", script],
        env={**env, "KVMPOD_VOLUME_TRANSPORT": transport}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"kvmpod run failed ({transport}): {out.stderr.strip()}")
    out = out.stdout
    result = {}
    for line in out.splitlines():
        words = line.split()
        result[words[0]] = {k: int(v) * 10 for k, v in zip(words[1::2], words[2::2])}  # centiseconds -> ms
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="MiB written and read")
    parser.add_argument("--files", type=int, default=500, help="small files created")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/volumes.py needs root (virtiofsd)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="kvmpod-bench-") as tmp:
        work = Path(tmp)
        aci, env = build_busybox_aci(work), bench_env(work)
        share = work / "share"
        share.mkdir()
        print(f"{'transport':10}{'op':8}{'tmpfs ms':>10}{'host ms':>10}{'ratio':>8}")
        for transport in ("virtiofs", "9p"):
            r = run_pod(env, aci, share, transport, args.size, args.files)
            for op, base in r["/empty"].items():
                host = r["/host"][op]
                print(f"{transport:10}{op:8}{base:10d}{host:10d}{host / max(base, 10):8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
