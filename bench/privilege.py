#!/usr/bin/env python3
"""What least privilege costs (docs/security.md): `kvmpod run /bin/true` (from its boot snapshot and
cold) and an idle pod's memory with QEMU confined — seccomp, the kvmpod-qemu user and chroot, the
pod's cgroup — against the same pods with all of it off ([security] sandbox/qemu-user/cgroup = false,
the switches for measuring only), interleaved in the same run so host noise hits both alike.

Usage: bench/privilege.py [--runs N]   (run_all.py runs it as its "least privilege" section)
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, bench_env, build_busybox_aci, stats, timed  # noqa: E402

# every [security] switch off; a key this kvmpod does not know yet is not read
OFF = "[security]\nsandbox = false\nqemu-user = false\ncgroup = false\n"


def _envs(work: Path) -> dict[str, dict[str, str]]:
    off = work / "security-off.toml"
    off.write_text(OFF)
    on = bench_env(work)
    return {"confined": on, "unconfined": {**on, "KVMPOD_CONFIG": str(off)}}


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def _idle_qemu(env: dict[str, str], aci: Path) -> tuple[int, dict[str, str]]:
    """QEMU's PSS (KiB) in an idle `sleep 30` pod, and the /proc status lines that show its confinement."""
    pods = Path(env["KVMPOD_RUN_DIR"]) / "pods"
    before = set(pods.glob("*")) if pods.exists() else set()
    proc = subprocess.Popen([*KVMPOD, "run", str(aci), "--exec", "/bin/sleep", "--", "30"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        state: dict = {}
        while state.get("state") != "running":
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the idle pod never ran")
            for state_file in (set(pods.glob("*")) - before if pods.exists() else set()):
                try:
                    state = json.loads((state_file / "state.json").read_text())
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
        time.sleep(2.0)  # quiet: the relay has taken over, QEMU has settled
        pid = state["qemu_pid"]
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return _pss_kib(pid), {k: status[k].split()[0] for k in ("Uid", "Seccomp", "NoNewPrivs")}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def measure_privilege(work: Path, aci: Path, runs: int, memory_runs: int = 3) -> dict:
    envs = _envs(work)
    argv = [*KVMPOD, "run", str(aci)]
    cold = [*KVMPOD, "run", "--boot", "cold", str(aci)]
    for env in envs.values():   # warm: disk, store, boot snapshot (the same for both: confinement is not in its shape)
        timed(argv, env=env)
        timed(cold, env=env)
    times: dict[str, dict[str, list[float]]] = {k: {"snapshot": [], "cold": []} for k in envs}
    for _ in range(runs):
        for name, env in envs.items():
            times[name]["snapshot"].append(timed(argv, env=env))
            times[name]["cold"].append(timed(cold, env=env))
    pss: dict[str, list[int]] = {k: [] for k in envs}
    seen: dict[str, dict[str, str]] = {}
    for _ in range(memory_runs):
        for name, env in envs.items():
            kib, seen[name] = _idle_qemu(env, aci)
            pss[name].append(kib)
    result: dict = {"runs": runs, "memory_runs": memory_runs, "switched_off": OFF.splitlines()[1:]}
    for name in envs:
        result[name] = {"start_snapshot": stats(times[name]["snapshot"]), "start_cold": stats(times[name]["cold"]),
                        "qemu_pss_kib": statistics.median(pss[name]), "qemu_status": seen[name],
                        "start_snapshot_s": times[name]["snapshot"], "start_cold_s": times[name]["cold"],
                        "qemu_pss_kib_all": pss[name]}
    c, u = result["confined"], result["unconfined"]
    result["ratio"] = {"start_snapshot": c["start_snapshot"]["median"] / u["start_snapshot"]["median"],
                       "start_cold": c["start_cold"]["median"] / u["start_cold"]["median"],
                       "qemu_pss": c["qemu_pss_kib"] / u["qemu_pss_kib"]}
    return result


def print_privilege(result: dict) -> None:
    c, u, r = result["confined"], result["unconfined"], result["ratio"]
    print(f"{result['runs']} start runs and {result['memory_runs']} idle pods each, interleaved; off = "
          + ", ".join(result["switched_off"]))
    print(f"{'':34}{'confined':>10}{'off':>10}{'ratio':>8}")
    print(f"{'kvmpod run /bin/true (snapshot) s':34}{c['start_snapshot']['median']:10.3f}"
          f"{u['start_snapshot']['median']:10.3f}{r['start_snapshot']:8.3f}")
    print(f"{'kvmpod run --boot cold, s':34}{c['start_cold']['median']:10.3f}"
          f"{u['start_cold']['median']:10.3f}{r['start_cold']:8.3f}")
    print(f"{'idle QEMU PSS MiB':34}{c['qemu_pss_kib'] / 1024:10.1f}{u['qemu_pss_kib'] / 1024:10.1f}"
          f"{r['qemu_pss']:8.3f}")
    print(f"{'QEMU uid / Seccomp / NoNewPrivs':34}{'/'.join(c['qemu_status'].values()):>10}"
          f"{'/'.join(u['qemu_status'].values()):>10}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmpod-bench-") as tmp:
        work = Path(tmp)
        print_privilege(measure_privilege(work, build_busybox_aci(work), args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
