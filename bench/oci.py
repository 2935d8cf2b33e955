#!/usr/bin/env python3
"""`podman run --rm IMAGE /bin/true` with kvmpod-oci against podman's own runtimes and `kvmpod run` of
the same busybox rootfs, measured in the same run, interleaved (docs/oci-runtime.md).

    podman + kvmpod-oci    each container in its own VM: its rootfs over virtio-fs, so a cold boot
    podman + runc          the native baseline: the same podman, conmon and netavark, no VM
    podman + crun          Debian's default runtime, where it can run (here: "cgroups in hybrid mode not
                           supported", which the result records instead)
    kvmpod run             the same rootfs as an ACI: from its boot snapshot, and --boot cold

podman runs isolated as in the tests (tests/podman_env.py: its own storage and network namespace).
Usage: bench/oci.py [--runs N]   (prints a table; not a test, asserts nothing; needs root and podman)
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import KVMPOD, Unavailable, bench_env, section_main, stats, timed  # noqa: E402

from tests.podman_env import IMAGE, PODMAN, Podman, isolated_podman  # noqa: E402




def _podman_true(podman: Podman, runtime: str) -> float:
    began = time.perf_counter()
    done = podman("run", "--rm", "--network", "none", IMAGE, "/bin/true", runtime=runtime)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"podman --runtime {runtime}: exit {done.returncode}: "
                           f"{done.stderr.decode().strip().splitlines()[-1:]}")
    return took


def measure_oci(work: Path, aci: Path, runs: int) -> dict:
    if os.geteuid() != 0 or PODMAN is None:
        raise Unavailable("needs root and podman (make setup installs it)")
    env = bench_env(work)
    rootfs = work / "rootfs"   # build_busybox_aci made it: the same tree the ACI holds
    with isolated_podman(work / "podman", env, rootfs) as podman:
        runtimes = {"kvmpod-oci": str(podman.runtime), "runc": shutil.which("runc") or "runc",
                    "crun": shutil.which("crun") or "crun"}
        unavailable: dict[str, str] = {}
        for name, path in list(runtimes.items()):
            try:
                _podman_true(podman, path)   # warm: layers, conmon, the kernel and initrd caches
            except RuntimeError as e:
                unavailable[name] = str(e)
                del runtimes[name]
        if "kvmpod-oci" not in runtimes:
            raise Unavailable(f"kvmpod-oci under podman failed: {unavailable['kvmpod-oci']}")
        run_argv = [*KVMPOD, "run", str(aci)]
        cold_argv = [*KVMPOD, "run", "--boot", "cold", str(aci)]
        timed(run_argv, env=env)
        timed(cold_argv, env=env)
        times: dict[str, list[float]] = {name: [] for name in [*runtimes, "kvmpod_run", "kvmpod_run_cold"]}
        for _ in range(runs):
            for name, path in runtimes.items():
                times[name].append(_podman_true(podman, path))
            times["kvmpod_run"].append(timed(run_argv, env=env))
            times["kvmpod_run_cold"].append(timed(cold_argv, env=env))
    result: dict = {"runs": runs, "unavailable": unavailable}
    for name, values in times.items():
        result[name] = stats(values)
        result[f"{name}_s"] = values
    oci = result["kvmpod-oci"]["median"]
    for base in ("runc", "crun", "kvmpod_run", "kvmpod_run_cold"):
        if base in result:
            result[f"ratio_oci_to_{base}"] = oci / result[base]["median"]
    return result


def print_oci(result: dict) -> None:
    rows = [("podman + kvmpod-oci", "kvmpod-oci"), ("podman + runc (no VM)", "runc"), ("podman + crun", "crun"),
            ("kvmpod run (boot snapshot)", "kvmpod_run"), ("kvmpod run --boot cold", "kvmpod_run_cold")]
    oci = result["kvmpod-oci"]["median"]
    print(f"{'':30} {'min':>8} {'median':>8}  kvmpod-oci / this")
    for label, key in rows:
        if key in result:
            s = result[key]
            print(f"{label:30} {s['min']:8.3f} {s['median']:8.3f}  {oci / s['median']:.2f}")
        elif key in result["unavailable"]:
            print(f"{label:30} unavailable: {result['unavailable'][key]}")


def main() -> int:
    return section_main(__doc__, measure_oci, print_oci, runs=5)


if __name__ == "__main__":
    raise SystemExit(main())
