#!/usr/bin/env python3
"""All of kvmpod's benchmarks, each next to a baseline measured in the same run (`make bench`).

1. start      kvmpod run /bin/true vs bare QEMU (minimal kernel, then the distro kernel)
1b. restore floor  kvmpod run /bin/true (snapshot) vs a C harness restoring the same snapshot with the same
              QEMU argv, and vs the cold floor (bench/floor.py, bench/restore_floor.c)
2. breakdown  where a run's time goes, from `--keep` runs' state.json timings
3. memory     PSS of QEMU + kvmpod (kvmpod-relay once the pod is quiet) for an idle pod vs a sleeping python3
              (bench/density.py), and density: N = 1, 4, 16 idle pods at once, total and per-pod PSS
4. scale      N = 1..32 concurrent pods: pods/s, N=32 vs N=2 (bench/density.py)
5. cli        `kvmpod --help` vs `python3 -c pass`
6. image      import + ISO build throughput on a Debian minbase rootfs vs gzip|sha512sum, tar -x, xorriso;
              the cost of a cached second run (bench/image.py; needs root + debootstrap the first time)
7. agent      stdout throughput and exec latency per agent transport vs virtio-serial (bench/agent.py)
8. stage1     start through kvmpod's stage1 (tests/stage0.py, rkt's ABI) vs kvmpod run of the same pod
              (bench/stage1.py; needs root)
9. oci        podman run --rm IMAGE /bin/true with kvmpod-oci vs runc and crun, and vs kvmpod run of the
              same rootfs (bench/oci.py; needs root and podman)
10. least privilege  start time and idle QEMU memory with QEMU confined (seccomp, kvmpod-qemu user and
              chroot, the pod's cgroup) vs the same with [security] switched off (bench/privilege.py)
11. soak      500 mixed pods one after the other, then waves of 16: exit codes, and the slope per 100 pods
              of what could accumulate (bench/soak.py)
12. libvirt   kvmpod run --backend libvirt /bin/true vs the QEMU backend vs the floor, and an idle pod's
              memory on each backend (bench/backends.py; needs root, libvirtd and libvirt-python)
13. first run  `kvmpod run` of a new image from empty dirs vs cold floor + gzip|sha512sum, and the
              metadata service's latency over a pod's first 20 requests (bench/firstrun.py)
14. volumes   start with a host volume over 9p (snapshot) and virtio-fs (cold) vs none, and each transport's
              throughput vs tmpfs (bench/volumes.py; needs root)
15. paths     start per network (none, user, the bridge in a netns of its own) and with vsock-user, from the
              snapshot and cold, vs the cold floor and --net none (bench/paths.py)

Each section's header shows a machine probe (a fixed CPU-bound loop, ms): the test machine's speed drifts, and
the JSON keeps the probes (`machine_probe_ms`) next to the figures.
Writes bench/results/<date>.json and bench/results/<date>.png (the breakdown as a stacked bar).
Usage: bench/run_all.py [--runs N] [--distro-runs N] [--image-runs N]   (not a test, asserts nothing)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (KVMPOD, REPO, Unavailable as SectionUnavailable, bench_env, build_busybox_aci,  # noqa: E402
                    measure_start, print_start, stats, timed)
from agent import measure as measure_agent, print_agent  # noqa: E402
from image import measure_image, print_image  # noqa: E402
from stage1 import measure_stage1, print_stage1  # noqa: E402
from oci import measure_oci, print_oci  # noqa: E402
from privilege import measure_privilege, print_privilege  # noqa: E402
from soak import measure_soak, print_soak  # noqa: E402
from backends import measure_libvirt, print_libvirt  # noqa: E402
from floor import measure_floor, print_floor  # noqa: E402
from firstrun import measure_firstrun, measure_metadata, print_firstrun, print_metadata  # noqa: E402
from paths import measure_paths, print_paths  # noqa: E402
from density import measure_density, measure_scale, memory, print_density, print_scale  # noqa: E402
from volumes import measure_volumes, print_volumes  # noqa: E402
from kvmpod.vm.qemu_binary import find_qemu  # noqa: E402

PHASES = [  # (label, from, to) over state.json timings
    ("host prep", "start", "qemu_spawn"),
    ("QEMU + boot to agent", "qemu_spawn", "agent_ready"),
    ("app start", "agent_ready", "apps_started"),
    ("app run", "apps_started", "apps_exited"),
    ("teardown", "apps_exited", "vm_ended"),
]


# The machine's own speed at each section's start: a fixed CPU-bound loop, the fastest of three tries.
# This test machine is itself a VM whose speed drifts by up to 3x within the hour (the same loop took
# 80 to 300 ms on the evening of 2026-12-07), so a figure compared across sections or runs needs it
# next to it; the ratios within a section are measured interleaved and need it less.
SPEED_PROBES: dict[str, float] = {}


def machine_probe_ms() -> float:
    def once() -> float:
        began, total = time.perf_counter(), 0
        for i in range(1_000_000):
            total += i
        return (time.perf_counter() - began) * 1000
    return min(once() for _ in range(3))


def header(title: str) -> None:
    SPEED_PROBES[title] = probe = machine_probe_ms()
    print(f"\n== {title} ==  (machine probe {probe:.0f} ms: a fixed loop, lower is faster)")


def breakdown(work: Path, aci: Path, runs: int) -> dict:
    env = bench_env(work)
    pods = Path(env["KVMPOD_RUN_DIR"]) / "pods"
    phases: dict[str, list[float]] = {label: [] for label, _, _ in PHASES}
    walls = []
    for _ in range(runs):
        before = set(pods.glob("*")) if pods.exists() else set()
        walls.append(timed([*KVMPOD, "run", "--keep", str(aci)], env=env))
        (pod,) = set(pods.glob("*")) - before
        timings = json.loads((pod / "state.json").read_text())["timings"]
        shutil.rmtree(pod)
        for label, a, b in PHASES:
            phases[label].append(timings[b] - timings[a])
    medians = {label: statistics.median(v) for label, v in phases.items()}
    total = sum(medians.values())
    wall = statistics.median(walls)
    print(f"{runs} runs, medians (s)")
    for label, value in medians.items():
        print(f"{label:28}{value:8.3f}{value / total:8.0%}")
    print(f"{'sum of phases':28}{total:8.3f}")
    print(f"{'wall (incl. python startup)':28}{wall:8.3f}   python+imports before 'start': {wall - total:.3f}")
    return {"runs": runs, "median_s": medians, "sum_s": total, "wall_median_s": wall, "samples_s": phases}


def cli(runs: int) -> dict:
    help_t = [timed([*KVMPOD, "--help"]) for _ in range(runs)]
    pass_t = [timed([sys.executable, "-c", "pass"]) for _ in range(runs)]
    h, p = statistics.median(help_t), statistics.median(pass_t)
    print(f"{'kvmpod --help':24}{h:8.3f}")
    print(f"{'baseline: python3 -c pass':24}{p:8.3f}")
    print(f"{'ratio':24}{h / p:8.1f}   (median of {runs})")
    return {"runs": runs, "help": stats(help_t), "python_pass": stats(pass_t), "ratio_median": h / p}


def plot(results: dict, out: Path) -> None:
    """One PNG a user can read: start side by side with its floors, phase by phase (Python start
    included), the breakdown of kvmpod's own phases, and the density and scale curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    start_ax, phase_ax, density_ax, scale_ax = axes.flat
    floor = results.get("restore_floor", {})
    if "kvmpod_phases_s" in floor:
        kv, fl = floor["kvmpod_phases_s"], floor["restore_floor_phases_s"]
        bars = {  # label: [(phase, seconds)], stacked bottom to top
            "restore floor\n(C harness)": [("spawn to agent HELLO", fl["hello"]),
                                            ("HELLO to app exit", fl["exit"] - fl["hello"]),
                                            ("teardown", fl["end"] - fl["exit"])],
            "kvmpod run\n(snapshot)": [("Python start + planning", kv["before_spawn"]),
                                        ("spawn to agent HELLO", kv["hello"]),
                                        ("HELLO to app exit", kv["exit"] - kv["hello"]),
                                        ("teardown", kv["end"] - kv["exit"])],
            "cold floor\n(bare QEMU boot)": [("cold boot, whole", floor["cold_floor"]["median"])],
        }
        colours = {"Python start + planning": "tab:red", "spawn to agent HELLO": "tab:blue",
                   "HELLO to app exit": "tab:green", "teardown": "tab:gray", "cold boot, whole": "tab:purple"}
        seen: set[str] = set()
        for x, (label, parts) in enumerate(bars.items()):
            bottom = 0.0
            for phase, value in parts:
                start_ax.bar(x, value, bottom=bottom, color=colours[phase],
                             label=None if phase in seen else phase)
                seen.add(phase)
                bottom += value
            start_ax.text(x, bottom, f"{bottom:.3f} s", ha="center", va="bottom", fontsize=9)
        start_ax.set_xticks(range(len(bars)), list(bars))
        start_ax.set_ylabel("seconds (medians)")
        start_ax.set_title(f"start of /bin/true: {floor['ratio_median']:.2f}x the restore floor")
        start_ax.legend(fontsize=8)
    else:
        start_ax.text(0.5, 0.5, f"restore floor: {floor.get('skipped', 'not measured')}", ha="center")
    breakdown = results["breakdown"]
    bottom = 0.0
    python = breakdown["wall_median_s"] - breakdown["sum_s"]
    palette = iter(["tab:red", "tab:orange", "tab:blue", "tab:green", "tab:olive", "tab:gray", "tab:cyan"])
    for label, value in [("Python start and imports", python), *breakdown["median_s"].items()]:
        phase_ax.barh(["kvmpod run"], [value], left=bottom, color=next(palette), label=f"{label} {value:.3f}s")
        bottom += value
    phase_ax.set_xlabel("seconds (medians)")
    phase_ax.set_title(f"kvmpod run's phases, wall {breakdown['wall_median_s']:.3f} s ({breakdown['runs']} runs)")
    phase_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    rows = results.get("density", {}).get("density", [])
    if rows:
        ns = [r["n"] for r in rows]
        density_ax.plot(ns, [r["total_mib"] for r in rows], "o-", label="total PSS")
        density_ax.plot(ns, [r["n"] * 16 for r in rows], "--", color="gray", label="target: 16 MiB a pod")
        for r in rows:
            density_ax.annotate(f"{r['per_pod_mib']:.1f} MiB/pod", (r["n"], r["total_mib"]), fontsize=8,
                                textcoords="offset points", xytext=(4, -10))
        density_ax.set_xlabel("idle pods at once")
        density_ax.set_ylabel("MiB")
        density_ax.set_title("density: idle busybox pods, total PSS")
        density_ax.legend(fontsize=8)
    rows = results.get("scale", {}).get("scale", [])
    if rows:
        ns = [r["n"] for r in rows]
        scale_ax.plot(ns, [r["pods_per_s"] for r in rows], "o-", label="pods/s")
        by_n = {r["n"]: r for r in rows}
        if 2 in by_n:
            scale_ax.axhline(0.9 * by_n[2]["pods_per_s"], ls="--", color="gray", label="target: 0.9x N=2")
        scale_ax.set_xscale("log", base=2)
        scale_ax.set_xticks(ns, [str(n) for n in ns])
        scale_ax.set_xlabel("concurrent kvmpod run /bin/true")
        scale_ax.set_ylabel("pods per second")
        scale_ax.set_ylim(bottom=0)
        scale_ax.set_title("scale")
        scale_ax.legend(fontsize=8)
    fig.suptitle(f"kvmpod bench {results['date']}, {results['cpus']} CPUs, {results.get('accel', '')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def optional(measure: Callable[[], dict], show: Callable[[dict], None], unavailable: type[Exception]) -> dict:
    """A benchmark this machine may not be able to run (no root, no debootstrap, no podman): its result,
    printed, or {"skipped": why}, so the other results are still written."""
    try:
        result = measure()
    except unavailable as e:
        print(f"skipped: {e}")
        return {"skipped": str(e)}
    show(result)
    return result


def collect_targets(results: dict) -> list[dict]:
    """Every section's "targets" (bench/common.py target()), in section order."""
    found: list[dict] = []
    for section in results.values():
        if isinstance(section, dict):
            found.extend(section.get("targets", []))
    return found


def print_targets(targets: list[dict]) -> None:
    for t in targets:
        sign = ">=" if t["higher_is_better"] else "<="
        verdict = "met" if t["met"] else "NOT met"
        note = f"  ({t['note']})" if t["note"] else ""
        print(f"{t['target']:52} {t['measured']:9.3f} {sign} {t['limit']:<7g}{t['unit']:5} {verdict}{note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="start runs with the minimal kernel, and breakdown runs")
    parser.add_argument("--distro-runs", type=int, default=5)
    parser.add_argument("--help-runs", type=int, default=20)
    parser.add_argument("--scale", default="1,2,4,8,16,32")
    parser.add_argument("--scale-rounds", type=int, default=3, help="rounds of the scale curve, Ns interleaved")
    parser.add_argument("--image-runs", type=int, default=3)
    parser.add_argument("--agent-mib", type=int, default=128, help="MiB streamed per agent transport (and per ceiling run)")
    parser.add_argument("--stage1-runs", type=int, default=5)
    parser.add_argument("--oci-runs", type=int, default=5)
    parser.add_argument("--firstrun-runs", type=int, default=3, help="first runs per image, metadata rounds")
    parser.add_argument("--soak-pods", type=int, default=500, help="the soak's sequential pods")
    parser.add_argument("--soak-waves", type=int, default=5, help="the soak's waves of 16 concurrent pods")
    args = parser.parse_args()
    began = time.perf_counter()
    qemu = find_qemu()
    results: dict = {"date": datetime.date.today().isoformat(), "host": os.uname().nodename,
                     "cpus": os.cpu_count(), "qemu": {"path": str(qemu.path), "source": qemu.source}}
    print(f"QEMU: {qemu.path} ({qemu.source}); the floor runs the same binary")
    with tempfile.TemporaryDirectory(prefix="kvmpod-bench-") as tmp:
        work = Path(tmp)
        aci = build_busybox_aci(work)
        header("1. start (minimal kernel)")
        results["start_minimal"] = measure_start(work, aci, args.runs)
        print_start(results["start_minimal"])
        results["accel"] = results["start_minimal"]["accel"]
        header("1. start (distro kernel)")
        results["start_distro"] = measure_start(work, aci, args.distro_runs, "distro")
        print_start(results["start_distro"])
        header("1b. restore floor (kvmpod run vs the same snapshot restored by a C harness)")
        results["restore_floor"] = optional(lambda: measure_floor(work, aci, args.runs), print_floor,
                                            SectionUnavailable)
        header("2. breakdown (minimal kernel)")
        results["breakdown"] = breakdown(work, aci, args.runs)
        header("3. memory (idle busybox pod)")
        results["memory"] = memory(work, aci)
        header("3. density (N idle busybox pods at once)")
        results["density"] = measure_density(work, aci)
        print_density(results["density"])
        header("4. scale (concurrent kvmpod run /bin/true)")
        results["scale"] = measure_scale(work, aci, tuple(int(n) for n in args.scale.split(",")), args.scale_rounds)
        print_scale(results["scale"])
        header("5. cli")
        results["cli"] = cli(args.help_runs)
        header("7. agent transports")
        results["agent"] = measure_agent(work, aci, args.agent_mib, execs=20, rounds=5)
        print_agent(results["agent"])
        header("8. stage1 (rkt's stage1 ABI through tests/stage0.py)")
        results["stage1"] = optional(lambda: measure_stage1(work, aci, args.stage1_runs), print_stage1,
                                     SectionUnavailable)
        header("9. oci (podman run --rm IMAGE /bin/true)")
        results["oci"] = optional(lambda: measure_oci(work, aci, args.oci_runs), print_oci, SectionUnavailable)
        header("10. least privilege (confined QEMU vs [security] off)")
        results["least_privilege"] = measure_privilege(work, aci, args.runs)
        print_privilege(results["least_privilege"])
        header("11. soak (mixed pods: sequential, then waves of 16)")
        results["soak"] = measure_soak(aci, work, args.soak_pods, args.soak_waves, 16)
        print_soak(results["soak"])
        header("12. libvirt (the libvirt backend vs the QEMU backend vs the floor)")
        results["libvirt"] = optional(lambda: measure_libvirt(work, aci, args.runs), print_libvirt,
                                      SectionUnavailable)
        header("13. first run of a new image, and metadata service latency")
        results["firstrun"] = measure_firstrun(work, aci, args.firstrun_runs)
        print_firstrun(results["firstrun"])
        results["metadata"] = optional(lambda: measure_metadata(work, aci, args.firstrun_runs), print_metadata,
                                       SectionUnavailable)
        header("14. volumes (a host volume's start and throughput per transport)")
        results["volumes"] = optional(lambda: measure_volumes(work, aci, 5), print_volumes, SectionUnavailable)
        header("15. paths (start per network and agent transport, snapshot and cold)")
        results["paths"] = measure_paths(work, aci, 10)   # 5 runs let the drift decide a 1.15x line
        print_paths(results["paths"])
    header("6. image (import + rootfs disk of a Debian minbase)")
    results["image"] = optional(lambda: measure_image(args.image_runs), print_image, SectionUnavailable)
    results["targets"] = collect_targets(results)
    results["machine_probe_ms"] = dict(SPEED_PROBES)
    probes = sorted(SPEED_PROBES.values())
    print(f"\nmachine probe over the run: {probes[0]:.0f} to {probes[-1]:.0f} ms "
          f"({probes[-1] / probes[0]:.2f}x between its fastest and slowest section)")
    header("targets (issue 22)")
    print_targets(results["targets"])
    results["total_s"] = time.perf_counter() - began
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{results['date']}.json", out / f"{results['date']}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path)
    print(f"\nwrote {json_path.relative_to(REPO)}, {png_path.relative_to(REPO)}; "
          f"total {results['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
