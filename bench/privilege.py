#!/usr/bin/env python3
"""What least privilege costs (docs/security.md): `kvmpod run /bin/true` (from its boot snapshot and
cold) and an idle pod's memory with QEMU confined — seccomp, the kvmpod-qemu user and chroot, the
pod's cgroup — against the same pods with all of it off ([security] sandbox/qemu-user/cgroup = false,
the switches for measuring only), and with the cgroup alone off (what the cgroup costs by itself),
interleaved in the same run so host noise hits all of them alike.

Usage: bench/privilege.py [--runs N]   (run_all.py runs it as its "least privilege" section)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, bench_env, idle_pod, pss_kib, section_main, stats, timed  # noqa: E402

# every [security] switch off; a key this kvmpod does not know yet is not read
OFF = "[security]\nsandbox = false\nqemu-user = false\ncgroup = false\n"
NO_CGROUP = "[security]\ncgroup = false\n"   # seccomp and the user switch on: the cgroup's own cost


def _envs(work: Path) -> dict[str, dict[str, str]]:
    off, no_cgroup = work / "security-off.toml", work / "cgroup-off.toml"
    off.write_text(OFF)
    no_cgroup.write_text(NO_CGROUP)
    on = bench_env(work)
    return {"confined": on, "no_cgroup": {**on, "KVMPOD_CONFIG": str(no_cgroup)},
            "unconfined": {**on, "KVMPOD_CONFIG": str(off)}}


def _cgroup_memory(state: dict) -> tuple[int, int] | None:
    """The idle pod's memory as its cgroup counts it (bytes) and its limit, or None without a cgroup."""
    where = state.get("cgroup", {}).get("controllers", {}).get("memory")
    if where is None:
        return None
    d = Path(where["path"])
    usage, limit = (("memory.current", "memory.max") if where["version"] == 2
                    else ("memory.usage_in_bytes", "memory.limit_in_bytes"))
    return int((d / usage).read_text()), int((d / limit).read_text())


def _idle_qemu(env: dict[str, str], aci: Path) -> tuple[int, dict[str, str], tuple[int, int] | None]:
    """QEMU's PSS (KiB) in an idle `sleep 30` pod, the /proc status lines that show its confinement, and
    its cgroup's memory usage and limit (bytes; None without a cgroup)."""
    with idle_pod(env, aci) as (_, state, _host):   # quiet: the relay has taken over, QEMU has settled
        pid = state["qemu_pid"]
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return (pss_kib(pid), {k: status[k].split()[0] for k in ("Uid", "Seccomp", "NoNewPrivs")},
                _cgroup_memory(state))


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
    charged: list[tuple[int, int]] = []
    for _ in range(memory_runs):
        for name, env in envs.items():
            kib, seen[name], in_cgroup = _idle_qemu(env, aci)
            pss[name].append(kib)
            if name == "confined" and in_cgroup:
                charged.append(in_cgroup)
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
    n = result["no_cgroup"]   # the cgroup alone: confined against confined without it
    result["ratio_cgroup"] = {"start_snapshot": c["start_snapshot"]["median"] / n["start_snapshot"]["median"],
                              "start_cold": c["start_cold"]["median"] / n["start_cold"]["median"],
                              "qemu_pss": c["qemu_pss_kib"] / n["qemu_pss_kib"]}
    result["cgroup_memory"] = ({"usage_bytes": statistics.median(u for u, _ in charged), "limit_bytes": charged[0][1]}
                               if charged else None)
    return result


def print_privilege(result: dict) -> None:
    c, n, u, r, rc = (result["confined"], result["no_cgroup"], result["unconfined"], result["ratio"],
                      result["ratio_cgroup"])
    print(f"{result['runs']} start runs and {result['memory_runs']} idle pods each, interleaved; off = "
          + ", ".join(result["switched_off"]) + "; no cgroup = only cgroup = false")
    print(f"{'':34}{'confined':>10}{'no cgroup':>10}{'off':>10}{'ratio':>8}{'cgroup':>8}")
    for label, key in (("kvmpod run /bin/true (snapshot) s", "start_snapshot"), ("kvmpod run --boot cold, s", "start_cold")):
        print(f"{label:34}{c[key]['median']:10.3f}{n[key]['median']:10.3f}{u[key]['median']:10.3f}"
              f"{r[key]:8.3f}{rc[key]:8.3f}")
    print(f"{'idle QEMU PSS MiB':34}{c['qemu_pss_kib'] / 1024:10.1f}{n['qemu_pss_kib'] / 1024:10.1f}"
          f"{u['qemu_pss_kib'] / 1024:10.1f}{r['qemu_pss']:8.3f}{rc['qemu_pss']:8.3f}")
    print(f"{'QEMU uid / Seccomp / NoNewPrivs':34}{'/'.join(c['qemu_status'].values()):>10}"
          f"{'/'.join(n['qemu_status'].values()):>10}{'/'.join(u['qemu_status'].values()):>10}")
    if m := result["cgroup_memory"]:
        print(f"{'idle pod in its cgroup MiB':34}{m['usage_bytes'] / 2**20:10.1f}   of its limit "
              f"{m['limit_bytes'] / 2**20:.0f} MiB (ratio: confined/off; cgroup: confined/no cgroup)")


def main() -> int:
    return section_main(__doc__, measure_privilege, print_privilege)


if __name__ == "__main__":
    raise SystemExit(main())
