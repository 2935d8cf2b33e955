#!/usr/bin/env python3
"""Start time through kvmpod's stage1 (tests/stage0.py, rkt's stage1 ABI) against `kvmpod run` of the
same pod, measured in the same run, interleaved.

    stage0 + stage1      tests/stage0.py renders the pod directory (the stage1 ACI and the app's ACI
                         extracted, the pod manifest) and runs the stage1's run entrypoint to its exit
    stage1 run           the run entrypoint alone (exec to exit): what stage1 adds, rendering aside
    kvmpod run           `kvmpod run IMAGE` from its boot snapshot (the default), and --boot cold

A stage1 pod runs its app from the rendered rootfs directory over virtio-fs, so it boots cold (a boot
snapshot cannot carry a virtio-fs device): `kvmpod run --boot cold` is its like-for-like baseline.

Usage: bench/stage1.py [--runs N]   (prints a table; not a test, asserts nothing; needs root: virtiofsd)
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, Unavailable, bench_env, section_main, stats, timed  # noqa: E402

from kvmpod.stage1.build import build_aci  # noqa: E402
from tests.stage0 import App, Stage0  # noqa: E402




def _stage1_once(stage0: Stage0, aci: Path, env: dict[str, str]) -> tuple[float, float]:
    """(render + run, run alone) of one pod; the pod directory is removed afterwards (untimed)."""
    began = time.perf_counter()
    pod = stage0.prepare([App(aci)])
    ran = time.perf_counter()
    result = stage0.run(pod, stage0.run_argv(pod, net="none"), env=env)
    ended = time.perf_counter()
    if result.returncode != 0:
        raise RuntimeError(f"stage1 run failed ({result.returncode}): {result.stderr.decode().strip()}")
    shutil.rmtree(pod.path)
    return ended - began, ended - ran


def measure_stage1(work: Path, aci: Path, runs: int) -> dict:
    if os.geteuid() != 0:
        raise Unavailable("kvmpod's stage1 runs apps from their rendered rootfs over virtio-fs: virtiofsd needs root")
    stage1 = work / "kvmpod-stage1.aci"
    stage1.write_bytes(build_aci(sys.executable))
    stage0 = Stage0(work / "rkt", stage1)
    env = bench_env(work)
    run_argv = [*KVMPOD, "run", str(aci)]
    cold_argv = [*KVMPOD, "run", "--boot", "cold", str(aci)]
    timed(run_argv, env=env)   # warm: image imported, disk built, boot snapshot made
    timed(cold_argv, env=env)
    _stage1_once(stage0, aci, env)
    full_t, entry_t, run_t, cold_t = [], [], [], []
    for _ in range(runs):
        full, entry = _stage1_once(stage0, aci, env)
        full_t.append(full)
        entry_t.append(entry)
        run_t.append(timed(run_argv, env=env))
        cold_t.append(timed(cold_argv, env=env))
    result = {"runs": runs, "stage0_stage1": stats(full_t), "stage1_run": stats(entry_t), "run": stats(run_t),
              "run_cold": stats(cold_t), "stage0_stage1_s": full_t, "stage1_run_s": entry_t, "run_s": run_t,
              "run_cold_s": cold_t}
    result["ratio_stage1_to_run"] = result["stage1_run"]["median"] / result["run"]["median"]
    result["ratio_stage1_to_run_cold"] = result["stage1_run"]["median"] / result["run_cold"]["median"]
    result["ratio_stage0_stage1_to_run"] = result["stage0_stage1"]["median"] / result["run"]["median"]
    return result


def print_stage1(result: dict) -> None:
    base = result["run"]["median"]
    print(f"{result['runs']} runs each, interleaved; ratios of medians to `kvmpod run` (snapshot)")
    print(f"{'':38}{'min':>8}{'median':>9}{'ratio':>8}")
    for key, label in (("run", "kvmpod run /bin/true (snapshot)"), ("run_cold", "kvmpod run --boot cold"),
                       ("stage1_run", "stage1 run entrypoint"), ("stage0_stage1", "stage0 render + stage1 run")):
        row = result[key]
        print(f"{label:38}{row['min']:8.3f}{row['median']:9.3f}{row['median'] / base:8.2f}")
    print(f"stage1 run / kvmpod run --boot cold: {result['ratio_stage1_to_run_cold']:.2f}")


def main() -> int:
    return section_main(__doc__, measure_stage1, print_stage1)


if __name__ == "__main__":
    raise SystemExit(main())
