#!/usr/bin/env python3
"""Density and scale (issue 22): what idle pods cost the host, and how many pods a second N concurrent
`kvmpod run` finish.

- memory   one idle busybox pod: PSS of QEMU + the pod's host process (kvmpod-relay once quiet) vs a
           sleeping python3, and what the relay costs on the way back (SIGTERM to exit)
- density  N = 1, 4, 16 idle pods of one shape at once: total PSS of everything they cost the host (QEMU,
           the host process, virtiofsd if any) and PSS per pod. Target: 16 pods <= 256 MiB in all.
- scale    N = 1, 2, 4, 8, 16, 32 concurrent `kvmpod run /bin/true`: pods/s. Target: pods/s at N=32
           >= 0.9 x pods/s at N=2.

Usage: bench/density.py [--runs N]   (runs: rounds of the scale curve; not a test, asserts nothing)
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, bench_env, idle_pod, pss_kib, section_main, target, wait_host, wait_state  # noqa: E402

DENSITY_COUNTS = (1, 4, 16)
SCALE_COUNTS = (1, 2, 4, 8, 16, 32)
DENSITY_LIMIT_MIB = 256


def stop_time(env: dict[str, str], aci: Path) -> tuple[float, str]:
    """SIGTERM to an idle pod's process until it has exited (the app is killed, the VM ends)."""
    with idle_pod(env, aci) as (proc, _, host):
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        return time.perf_counter() - start, host


def memory(work: Path, aci: Path, stop_runs: int = 3) -> dict:
    env = bench_env(work)
    with idle_pod(env, aci) as (proc, state, host):
        qemu, kvmpod = pss_kib(state["qemu_pid"]), pss_kib(proc.pid)
    base = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        baseline = pss_kib(base.pid)
    finally:
        base.kill()
        base.wait()
    total = qemu + kvmpod
    print(f"{'':34}{'PSS MiB':>8}")
    print(f"{'QEMU (256M guest, idle sleep)':34}{qemu / 1024:8.1f}")
    print(f"{'kvmpod process (' + host + ')':34}{kvmpod / 1024:8.1f}")
    print(f"{'pod total':34}{total / 1024:8.1f}")
    print(f"{'baseline: python3 sleeping':34}{baseline / 1024:8.1f}")
    print(f"{'ratio pod/baseline':34}{total / baseline:8.1f}   kvmpod exit {proc.returncode}")
    # what the relay costs: the way back into kvmpod on the first event, here a SIGTERM
    stops: dict[str, list[float]] = {"kvmpod-relay": [], "kvmpod": []}
    for _ in range(stop_runs):
        for relay in ("on", "off"):
            took, held_by = stop_time({**env, "KVMPOD_RELAY": "off"} if relay == "off" else env, aci)
            stops[held_by].append(took)
    medians = {k: statistics.median(v) for k, v in stops.items() if v}
    print(f"{'SIGTERM to exit, median s':34}" + "   ".join(f"{k} {v:.3f} ({len(stops[k])})" for k, v in medians.items()))
    if len(medians) == 2:
        print(f"{'ratio relay/kvmpod':34}{medians['kvmpod-relay'] / medians['kvmpod']:8.2f}")
    return {"qemu_pss_kib": qemu, "kvmpod_pss_kib": kvmpod, "total_pss_kib": total, "host_process": host,
            "baseline_python_sleep_pss_kib": baseline, "ratio": total / baseline, "kvmpod_exit": proc.returncode,
            "stop_s": stops}


# -- density: N idle pods at once -----------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """`pid`'s direct children (virtiofsd, when a pod has a host volume)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def smaps_kinds(pid: int) -> dict[str, int]:
    """PSS of `pid` by kind of mapping, KiB: guest RAM (the snapshot's memory file), the TCG code buffer
    (the largest anonymous rwx mapping), the binary and libraries, the rest (heap, stacks, anonymous)."""
    kinds = {"guest_ram": 0, "tcg": 0, "binary": 0, "other": 0}
    kind = "other"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):      # a mapping's header: range perms offset dev inode [path]
                path = fields[5] if len(fields) > 5 else ""
                perms = fields[1]
                if path.endswith("/memory") or path.startswith("/memfd:"):
                    kind = "guest_ram"
                elif not path and "x" in perms:
                    kind = "tcg"
                elif path.startswith("/") and not path.startswith("/dev/"):
                    kind = "binary"
                else:
                    kind = "other"
            elif fields[0] == "Pss:":
                kinds[kind] += int(fields[1])
    return kinds


@contextlib.contextmanager
def idle_pods(env: dict[str, str], aci: Path, n: int, run_args: tuple[str, ...] = ()):
    """`n` idle pods (`sleep`) of one shape at once, once all are quiet: their processes and state.json."""
    pods = Path(env["KVMPOD_RUN_DIR"]) / "pods"
    before = set(pods.glob("*")) if pods.exists() else set()
    procs = [subprocess.Popen([*KVMPOD, "run", *run_args, str(aci), "--exec", "/bin/sleep", "--", "120"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    try:
        deadline = time.monotonic() + 60 + 5 * n
        while len(new := (set(pods.glob("*")) - before if pods.exists() else set())) < n:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"only {len(new)} of {n} pod directories appeared")
            time.sleep(0.05)
        states = [wait_state(pod / "state.json", "running", 60 + 5 * n) for pod in new]
        for pod in new:
            wait_host(pod / "state.json", 10 if env.get("KVMPOD_RELAY") != "off" else 1.5)
        time.sleep(1.0)  # let the idle pods settle
        yield procs, states
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)  # the second signal kills the VM
                p.wait(timeout=10)


def measure_idle(env: dict[str, str], aci: Path, n: int, run_args: tuple[str, ...] = ()) -> dict:
    """Total PSS of `n` idle pods: QEMU (by kind of mapping), the host process (kvmpod-relay once quiet),
    QEMU's children (virtiofsd)."""
    kinds = {"guest_ram": 0, "tcg": 0, "binary": 0, "other": 0}
    host_kib = helpers_kib = 0
    with idle_pods(env, aci, n, run_args) as (procs, states):
        for state in states:
            for kind, kib in smaps_kinds(state["qemu_pid"]).items():
                kinds[kind] += kib
            helpers_kib += sum(pss_kib(c) for c in children(state["qemu_pid"]))
        host_kib = sum(pss_kib(p.pid) for p in procs)  # kvmpod, exec'd into kvmpod-relay once quiet
    qemu_kib = sum(kinds.values())
    total_kib = qemu_kib + host_kib + helpers_kib
    return {"n": n, "total_mib": total_kib / 1024, "per_pod_mib": total_kib / 1024 / n,
            "qemu_mib": {k: v / 1024 / n for k, v in kinds.items()},  # per pod
            "host_process_mib": host_kib / 1024 / n, "helpers_mib": helpers_kib / 1024 / n}


def measure_density(work: Path, aci: Path, counts: tuple[int, ...] = DENSITY_COUNTS) -> dict:
    env = bench_env(work)
    subprocess.run([*KVMPOD, "run", str(aci)], env=env, check=True, stdout=subprocess.DEVNULL)  # the snapshot
    rows = [measure_idle(env, aci, n) for n in counts]
    last = rows[-1]
    where = ", ".join(f"{k} {v:.1f}" for k, v in last["qemu_mib"].items())
    result = {"density": rows, "targets": [target(
        f"{last['n']} idle busybox pods, total PSS", last["total_mib"], DENSITY_LIMIT_MIB, unit="MiB",
        note=f"per pod {last['per_pod_mib']:.1f} MiB: QEMU {where}, host process "
             f"{last['host_process_mib']:.1f}")]}
    return result


def print_density(result: dict) -> None:
    print(f"{'N':>4}{'total MiB':>11}{'per pod':>9}   per pod: guest RAM, TCG, binary, other, host process")
    for row in result["density"]:
        q = row["qemu_mib"]
        print(f"{row['n']:4}{row['total_mib']:11.1f}{row['per_pod_mib']:9.1f}   "
              f"{q['guest_ram']:.1f}, {q['tcg']:.1f}, {q['binary']:.1f}, {q['other']:.1f}, "
              f"{row['host_process_mib']:.1f}")


# -- scale: N concurrent pods --------------------------------------------------------------------------

def scale_once(env: dict[str, str], argv: list[str], n: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(n)]
    results = [(p.wait(), p.stderr.read().decode(errors="replace").strip() if p.stderr else "") for p in procs]
    wall = time.perf_counter() - start
    return wall, [f"exit {rc}: {err[-300:]}" for rc, err in results if rc != 0]


def measure_scale(work: Path, aci: Path, counts: tuple[int, ...] = SCALE_COUNTS, rounds: int = 1) -> dict:
    """Each N `rounds` times, the Ns interleaved round by round (host noise hits every N alike): the
    median wall per N."""
    env = bench_env(work)
    argv = [*KVMPOD, "run", str(aci), "--exec", "/bin/true"]
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)  # the snapshot, made once
    walls: dict[int, list[float]] = {n: [] for n in counts}
    failures: dict[int, list[str]] = {n: [] for n in counts}
    for _ in range(rounds):
        for n in counts:
            wall, failed = scale_once(env, argv, n)
            walls[n].append(wall)
            failures[n] += failed
    rows: list[dict] = []
    for n in counts:
        wall = statistics.median(walls[n])
        rows.append({"n": n, "wall_s": wall, "pods_per_s": n / wall, "walls_s": walls[n], "failures": failures[n]})
    by_n = {row["n"]: row for row in rows}
    result: dict = {"scale": rows, "rounds": rounds, "targets": []}
    if 2 in by_n and max(counts) > 2:
        top = by_n[max(counts)]
        ratio = top["pods_per_s"] / by_n[2]["pods_per_s"]
        result["targets"].append(target(
            f"pods/s at N={top['n']} vs N=2", ratio, 0.9, higher_is_better=True,
            note=f"{top['pods_per_s']:.2f} vs {by_n[2]['pods_per_s']:.2f} pods/s"))
    return result


def print_scale(result: dict) -> None:
    rows = result["scale"]
    base = rows[0]["pods_per_s"]
    print(f"{'N':>4}{'wall s':>9}{'pods/s':>9}{'vs N=1':>8}  failures   (median of {result['rounds']})")
    for row in rows:
        print(f"{row['n']:4}{row['wall_s']:9.3f}{row['pods_per_s']:9.2f}{row['pods_per_s'] / base:8.2f}  "
              f"{len(row['failures'])}")
        for failure in row["failures"][:3]:
            print(f"      {failure}")


# -- the section as run_all.py and section_main call it -------------------------------------------------

def measure(work: Path, aci: Path, runs: int) -> dict:
    density = measure_density(work, aci)
    scaled = measure_scale(work, aci, rounds=runs)
    return {"density": density["density"], "scale": scaled["scale"], "rounds": scaled["rounds"],
            "targets": [*density["targets"], *scaled["targets"]]}


def print_all(result: dict) -> None:
    print_density(result)
    print()
    print_scale(result)


if __name__ == "__main__":
    raise SystemExit(section_main(__doc__, measure, print_all, runs=1))
