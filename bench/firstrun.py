#!/usr/bin/env python3
"""First run of a new image, and the metadata service's latency (issue 22). Not a test, asserts nothing.

first run  `kvmpod run ACI /bin/true` with an empty store, snapshot and run dir (import, rootfs disk,
           boot snapshot, run), for the busybox ACI and the Debian minbase of bench/image.py (its cached
           fixture; skipped without it and without root+debootstrap), against the floor: the cold-boot
           floor (common.floor_vm) + `gzip -dc ACI | sha512sum`, measured interleaved in the same run.
           Also the same first run with `--boot cold` (no snapshot made), the gap being what making the
           snapshot costs on the critical path.
metadata   an app (bench/mdbench.c, static) makes 20 requests to the metadata service one after the other,
           each timed in the guest from connect() to the answer's last byte (a difference within one
           request: the guest clock's rate is right early after a restore, its value is not). p50 and
           max over a pod's 20 requests (the first included), for the first pod of a new image (empty
           dirs), for a pod from that image's boot snapshot, and for two first pods of new images at
           once (the machine busy).

Usage: bench/firstrun.py [--runs N]
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (KVMPOD, REPO, Unavailable, bench_env, floor_vm, section_main, stats, target,  # noqa: E402
                    timed)

FIRST_RUN_LIMIT = 1.5      # issue 22: first run <= 1.5x (cold floor + gzip -dc | sha512sum)
METADATA_MAX_MS = 50.0     # issue 22: max <= 50 ms over a pod's first 20 requests
REQUESTS = 20
_MADE = re.compile(r"boot snapshot (?:\S+ )?made in ([0-9.]+) s")


def _gzip_floor(aci: Path) -> float:
    return timed(["sh", "-c", 'gzip -dc "$1" | sha512sum', "sh", str(aci)])


def _fresh(work: Path, name: str) -> tuple[Path, dict[str, str]]:
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d, bench_env(d)


def _first_run(work: Path, name: str, aci: Path, boot: str) -> tuple[float, float | None]:
    """Wall of `kvmpod run` from empty dirs, and how long making the boot snapshot took (--debug says)."""
    d, env = _fresh(work, name)
    argv = [*KVMPOD, "run", "--debug", "--boot", boot, str(aci), "--exec", "/bin/true"]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    shutil.rmtree(d, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.decode()[-500:]}")
    made = _MADE.search(done.stderr.decode(errors="replace"))
    return wall, float(made.group(1)) if made else None


def _images(work: Path, aci: Path) -> tuple[list[tuple[str, Path]], dict]:
    images = [("busybox", aci)]
    skipped = {}
    try:
        from image import ensure_fixture
        debian, _ = ensure_fixture()
        images.append(("debian-minbase", debian))
    except Unavailable as e:
        skipped["debian-minbase"] = str(e)
    return images, skipped


def measure_firstrun(work: Path, aci: Path, runs: int) -> dict:
    floor = floor_vm(work)
    images, skipped = _images(work, aci)
    rows: dict[str, dict] = {}
    for name, path in images:
        samples: dict[str, list[float]] = {"floor": [], "gzip": [], "run": [], "run_cold": [], "snapshot_made": []}
        for i in range(runs):  # interleaved: host noise hits all alike
            samples["floor"].append(timed(floor.argv))
            samples["gzip"].append(_gzip_floor(path))
            wall, made = _first_run(work, f"f{i}{name[0]}", path, "snapshot")
            samples["run"].append(wall)
            if made is not None:
                samples["snapshot_made"].append(made)
            samples["run_cold"].append(_first_run(work, f"c{i}{name[0]}", path, "cold")[0])
        med = {k: statistics.median(v) for k, v in samples.items() if v}
        base = med["floor"] + med["gzip"]
        rows[name] = {"aci_bytes": path.stat().st_size, "median_s": med, "samples_s": samples,
                      "floor_plus_gzip_s": base, "ratio": med["run"] / base,
                      "ratio_cold": med["run_cold"] / base}
    targets = [target(f"first run {name} vs cold floor + gzip|sha512sum", row["ratio"], FIRST_RUN_LIMIT,
                      note=_first_run_note(row)) for name, row in rows.items()]
    return {"runs": runs, "images": rows, "skipped": skipped, "targets": targets}


def _first_run_note(row: dict) -> str:
    med = row["median_s"]
    made = med.get("snapshot_made")
    return (f"run {med['run']:.2f} s, of it snapshot making {made:.2f} s; first run booting cold "
            f"{med['run_cold']:.2f} s ({row['ratio_cold']:.2f}x)" if made is not None else
            f"run {med['run']:.2f} s")


def print_firstrun(result: dict) -> None:
    print(f"first run from empty dirs, medians of {result['runs']} (s)")
    print(f"{'image':16}{'ACI MB':>8}{'floor':>8}{'gzip':>8}{'run':>8}{'snap':>8}{'cold':>8}{'ratio':>8}{'cold':>8}")
    for name, row in result["images"].items():
        m = row["median_s"]
        print(f"{name:16}{row['aci_bytes'] / 1e6:8.1f}{m['floor']:8.3f}{m['gzip']:8.3f}{m['run']:8.3f}"
              f"{m.get('snapshot_made', float('nan')):8.3f}{m['run_cold']:8.3f}{row['ratio']:8.2f}{row['ratio_cold']:8.2f}")
    for name, why in result["skipped"].items():
        print(f"{name}: skipped: {why}")


# -- the metadata service ----------------------------------------------------------------------------

def build_mdbench_aci(work: Path) -> Path:
    aci = work / "mdbench.aci"
    if aci.exists():
        return aci
    rootfs = work / "mdbench-rootfs"
    subprocess.run(["sh", str(REPO / "tests" / "make-busybox-rootfs.sh"), str(rootfs)], check=True,
                   stdout=subprocess.DEVNULL)
    cc = shutil.which("musl-gcc") or shutil.which("gcc")
    if cc is None:
        raise Unavailable("no C compiler for bench/mdbench.c")
    subprocess.run([cc, "-static", "-O2", "-o", str(rootfs / "mdbench"), str(REPO / "bench" / "mdbench.c")],
                   check=True)
    subprocess.run([*KVMPOD, "image", "build", "--rootfs", str(rootfs), "--name", "bench/mdbench",
                    "--exec", "/mdbench", "-o", str(aci)], check=True, stdout=subprocess.DEVNULL)
    return aci


def _latencies(out: bytes, err: bytes, rc: int) -> list[float]:
    """The pod's request times in ms, from mdbench's MDLAT line (every answer must be a 200)."""
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("MDLAT"):
            words = line.split()[1:]
            pairs = list(zip(words[::2], words[1::2]))
            if rc == 0 and len(pairs) == REQUESTS and all(s == "200" for s, _ in pairs):
                return [int(us) / 1000 for _, us in pairs]
    raise RuntimeError(f"mdbench pod: exit {rc}, stdout {out[-300:]!r}, stderr {err.decode(errors='replace')[-500:]}")


def _md_pods(envs: list[dict[str, str]], aci: Path) -> list[list[float]]:
    argv = [*KVMPOD, "run", str(aci), "--exec", "/mdbench", "--", str(REQUESTS)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for env in envs]
    return [_latencies(*p.communicate(), p.returncode) for p in procs]


def _summary(pods: list[list[float]]) -> dict:
    """p50 and max per pod, then the median p50 and the worst max over the pods; the first request too."""
    return {"pods": len(pods), "p50_ms": statistics.median(statistics.median(p) for p in pods),
            "max_ms": max(max(p) for p in pods), "first_ms": stats([p[0] for p in pods]),
            "rest_max_ms": max(max(p[1:]) for p in pods), "samples_ms": pods}


def measure_metadata(work: Path, aci: Path, runs: int) -> dict:
    md = build_mdbench_aci(work)
    cases: dict[str, list[list[float]]] = {"first pod of a new image": [], "snapshot pod": [],
                                           "two first pods at once": []}
    for i in range(runs):
        d, env = _fresh(work, f"m{i}")
        cases["first pod of a new image"] += _md_pods([env], md)
        cases["snapshot pod"] += _md_pods([env], md)
        (a, env_a), (b, env_b) = _fresh(work, f"m{i}a"), _fresh(work, f"m{i}b")
        cases["two first pods at once"] += _md_pods([env_a, env_b], md)
        for path in (d, a, b):
            shutil.rmtree(path, ignore_errors=True)
    result = {name: _summary(pods) for name, pods in cases.items()}
    targets = [target(f"metadata max of first {REQUESTS} requests, {name}", r["max_ms"], METADATA_MAX_MS,
                      unit="ms", note=f"p50 {r['p50_ms']:.1f} ms, first request median {r['first_ms']['median']:.1f}"
                      f" ms, others' max {r['rest_max_ms']:.1f} ms")
               for name, r in result.items()]
    return {"runs": runs, "requests": REQUESTS, "cases": result, "targets": targets}


def print_metadata(result: dict) -> None:
    print(f"metadata service, {result['requests']} requests a pod, {result['runs']} rounds (ms, in the guest)")
    print(f"{'':26}{'pods':>5}{'p50':>8}{'max':>8}{'first':>8}{'others max':>12}")
    for name, r in result["cases"].items():
        print(f"{name:26}{r['pods']:5}{r['p50_ms']:8.1f}{r['max_ms']:8.1f}{r['first_ms']['median']:8.1f}"
              f"{r['rest_max_ms']:12.1f}")


def measure(work: Path, aci: Path, runs: int) -> dict:
    return {"firstrun": measure_firstrun(work, aci, runs), "metadata": measure_metadata(work, aci, runs)}


def show(result: dict) -> None:
    print_firstrun(result["firstrun"])
    print_metadata(result["metadata"])
    for section in result.values():
        for t in section["targets"]:
            print(f"{t['target']:64} {t['measured']:8.3f} <= {t['limit']:g}{t['unit']}  "
                  f"{'met' if t['met'] else 'NOT met'}  ({t['note']})")


if __name__ == "__main__":
    raise SystemExit(section_main(__doc__, measure, show, runs=3))
