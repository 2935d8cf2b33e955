#!/usr/bin/env python3
"""Agent transport benchmark: each transport against virtio-serial, measured in the same run.

Per transport (serial, vsock-user = kvmpod's userspace vsock backend, vhost-vsock where
/dev/vhost-vsock is usable):
  stream   stdout throughput: N MiB through `cat` in the guest (`head -c N /dev/zero | cat`), timed on
           the host from the first byte to the last, in six parts, each between two runs of the same
           pipeline into /dev/null in the same pod, timed inside the guest (what the guest alone costs
           under this accelerator: the ceiling). The target is the median over rounds of each pod's
           stream over its own ceiling
  exec     exec round-trip: `kvmpod enter`'s path (control socket -> agent START -> /bin/true ->
           EXIT) into a running pod, without the CLI's Python start-up; median of N
Transports are interleaved run by run so host noise hits them alike; every figure is printed with its
ratio to serial.

Usage: bench/agent.py [--mib N] [--execs N] [--rounds N]   (prints a table; not a test, asserts nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, bench_env, build_busybox_aci, target  # noqa: E402

from kvmpod.vm.transport import vhost_vsock_unusable  # noqa: E402


STREAM_LIMIT = 0.9   # stdout reaches the host at >= 0.9x the guest's own pipeline into /dev/null


def transports() -> list[str]:
    return ["serial", "vsock-user"] + (["vhost-vsock"] if vhost_vsock_unusable() is None else [])


# the guest's own pipeline into /dev/null, timed inside the guest (10 ms resolution), on stderr
_GUEST_PIPELINE = ('alone() {{ read a _ < /proc/uptime; head -c {size} /dev/zero | cat > /dev/null; '
                   'read b _ < /proc/uptime; echo "$a $b" >&2; }}; ')
LEGS = 6   # streams per pod, each between two runs of the ceiling's pipeline


def stream(env: dict[str, str], aci: Path, transport: str, mib: int) -> tuple[float, float]:
    """MB/s (10^6 bytes) of app stdout reaching kvmpod's stdout, and of the guest's own pipeline into
    /dev/null (the ceiling), measured in one pod in turns: ceiling, stream, ceiling, ... ceiling, LEGS
    streams of mib/LEGS MiB each. A stream's time runs from the arrival of its first byte to that of
    its last (the host tells the streams apart by their byte counts; the ceiling's runs write nothing),
    while a ceiling's run is timed in the guest from before `head` and `cat` start: that favours the
    stream by their start-up, a few percent of a turn under TCG.

    The turns are short (~1-2 s each) because this machine's speed drifts by up to 3x within the hour,
    and within a minute too: a ceiling from a pod of its own made the ratio swing between 0.7 and 1.05,
    and one stream between two ceiling runs of 7 s each between 0.67 and 1.10."""
    leg = (mib << 20) // LEGS
    script = (_GUEST_PIPELINE.format(size=leg)
              + f"i=0; alone; while [ $i -lt {LEGS} ]; do head -c {leg} /dev/zero | cat; alone; i=$((i+1)); done")
    proc = subprocess.Popen([*KVMPOD, "run", "--net", "none", "--agent-transport", transport, str(aci), "--exec",
                             "/bin/sh", "--", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    got, spent, first, legs = 0, 0.0, 0.0, 0
    while chunk := proc.stdout.read1(1 << 20):
        now = time.perf_counter()
        if got % leg == 0:
            first = now   # a stream's first bytes (a chunk does not span two: a ceiling run lies between)
        got += len(chunk)
        if got % leg == 0:
            spent, legs = spent + now - first, legs + 1
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() or got != leg * LEGS:
        raise SystemExit(f"{transport}: kvmpod run failed ({got} of {leg * LEGS} bytes): {err.strip()[-300:]}")
    spans = [float(b) - float(a) for a, b in (line.split() for line in err.splitlines() if line.count(" ") == 1)]
    if legs != LEGS:
        raise SystemExit(f"{transport}: {legs} of the {LEGS} streams told apart (a chunk spanned two)")
    if len(spans) != LEGS + 1:
        raise SystemExit(f"{transport}: the guest's pipeline timings are missing from stderr: {err.strip()[-300:]}")
    return got / spent / 1e6, leg * len(spans) / sum(spans) / 1e6


def exec_latency(env: dict[str, str], aci: Path, transport: str, execs: int) -> list[float]:
    """Seconds per enter of /bin/true into a running (detached) pod."""
    from kvmpod.pod import client, registry

    saved = dict(os.environ)
    os.environ.update(env)  # registry.find_pod reads KVMPOD_RUN_DIR; restored below, or what runs later
    try:                    # (matplotlib's config dir) would land in this run's work dir, removed by then
        out = subprocess.run([*KVMPOD, "run", "--detach", "--net", "none", "--agent-transport", transport,
                              str(aci), "--exec", "/bin/sleep", "--", "600"],
                             capture_output=True, text=True, env=env, check=True)
        uuid = out.stdout.split()[-1]
        pod = registry.find_pod(uuid)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    times = []
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for _ in range(execs):
            start = time.perf_counter()
            with client.connect(pod) as sock:
                status = client.EnterSession(sock, False, devnull, devnull, devnull).run(
                    client.EnterRequest(["/bin/true"]))
            times.append(time.perf_counter() - start)
            if status:
                raise SystemExit(f"{transport}: enter /bin/true exited {status}")
    finally:
        os.close(devnull)
        subprocess.run([*KVMPOD, "stop", "--force", uuid], env=env, capture_output=True)
        subprocess.run([*KVMPOD, "rm", uuid], env=env, capture_output=True)
    return times


def measure(work: Path, aci: Path, mib: int, execs: int, rounds: int) -> dict:
    env = bench_env(work)
    subprocess.run([*KVMPOD, "run", "--net", "none", str(aci)], env=env, check=True, capture_output=True)  # warm
    names = transports()
    mbps: dict[str, list[float]] = {t: [] for t in names}
    lat: dict[str, list[float]] = {t: [] for t in names}
    floor: dict[str, list[float]] = {t: [] for t in names}
    for _ in range(rounds):
        for t in names:
            mb, ceiling = stream(env, aci, t, mib)
            mbps[t].append(mb)
            floor[t].append(ceiling)
            lat[t] += exec_latency(env, aci, t, execs)
    ratio = {t: statistics.median(m / c for m, c in zip(mbps[t], floor[t])) for t in names}
    ceiling = statistics.median(c for t in names for c in floor[t])
    stream_mbps = {t: statistics.median(v) for t, v in mbps.items()}
    targets = [target(f"stdout over {t} vs the guest's own pipeline", ratio[t], STREAM_LIMIT,
                      higher_is_better=True,
                      note="" if ratio[t] >= STREAM_LIMIT else
                      "the stream costs the guest one more pipe stage than the pipeline into /dev/null (cat "
                      "writing into the agent's pipe; the agent splices it on; docs/performance.md, Streaming)")
               for t in names]
    return {"mib": mib, "execs": execs, "rounds": rounds, "guest_floor_mbps": ceiling, "targets": targets,
            "stream_mbps": stream_mbps, "stream_ratio": ratio,
            "exec_ms": {t: statistics.median(v) * 1000 for t, v in lat.items()},
            "samples": {"stream_mbps": mbps, "exec_s": lat, "ceiling_mbps": floor}}


def print_agent(r: dict) -> None:
    print(f"{r['mib']} MiB through cat, {r['execs']} execs x {r['rounds']} rounds; ratios against serial")
    base_s, base_e = r["stream_mbps"]["serial"], r["exec_ms"]["serial"]
    print(f"{'transport':14}{'stream MB/s':>12}{'ratio':>8}{'vs ceiling':>12}{'exec ms':>10}{'ratio':>8}")
    for t in r["stream_mbps"]:
        s, e = r["stream_mbps"][t], r["exec_ms"][t]
        print(f"{t:14}{s:12.1f}{s / base_s:8.2f}{r['stream_ratio'][t]:12.2f}{e:10.1f}{e / base_e:8.2f}")
    print(f"{'guest alone':14}{r['guest_floor_mbps']:12.1f}{r['guest_floor_mbps'] / base_s:8.2f}"
          "   (the pipeline into /dev/null in the guest, in each stream's pod: the ceiling; 'vs ceiling' is"
          " the median of each stream's ratio to its own pod's)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="MiB streamed through cat (and through the ceiling's pipeline, twice)")
    parser.add_argument("--execs", type=int, default=20, help="execs per pod")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the transports (odd: a median of ratios one slow minute does not move)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmpod-bench-") as tmp:
        work = Path(tmp)
        result = measure(work, build_busybox_aci(work), args.mib, args.execs, args.rounds)
        print_agent(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
