#!/usr/bin/env python3
"""The restore floor (issue 22): `kvmpod run /bin/true` from its boot snapshot against the least any
launcher can do with that snapshot, and against the cold-boot floor, interleaved in one run.

The restore floor is bench/restore_floor.c (build/bench/restore-floor, `make restore-floor`): no Python on
its path. It spawns the SAME QEMU binary with the SAME argv kvmpod spawned to restore this image's boot
snapshot (so the same memory and state files, devices, machine, confinement options), sends THAW,
answers HELLO, STARTs /bin/true, waits for its EXIT, quits QEMU over QMP and waits for it to exit: what
kvmpod's run path does, minus everything else. The argv is taken, before anything is timed, from a real
`kvmpod run --keep`: its own `qemu argv:` debug line (kvmpod/vm/spawn.py), caught by a log handler on
that one logger, so the kernel command line (and with it the snapshot's shape) is the one a plain run has.
What the floor does not do that kvmpod does: a pod cgroup, a pod directory and state.json, the image
store's lookups and locks, the pod's metadata service, an app's full START (environment, isolators),
and the teardown's clean-up.

The cold floor (bench/common.py floor_vm: bare QEMU booting the kernel to an init that powers off) is
kept as the second baseline. The section also compares phases: the floor's own clock (spawn to HELLO,
to the app's EXIT, to QEMU's exit, and QEMU's CPU time, which host load hardly moves) next to a
`--keep` run's state.json timings; and a third variant of the floor that sends, in place of its minimal
START, the frames kvmpod itself sent (the metadata documents, METADATA_START, kvmpod's START): the same
guest work as kvmpod, without kvmpod.

Usage: bench/floor.py [--runs N]   (run_all.py runs it as its "restore floor" section)
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, REPO, Unavailable, bench_env, floor_vm, section_main, stats, target, timed  # noqa: E402
from kvmpod.vm.spawn import restore_commands  # noqa: E402

HARNESS = REPO / "build" / "bench" / "restore-floor"
TARGET_RATIO = 1.25

# run `kvmpod ARGS` in this process, keeping the argv of the QEMU it spawns to restore a snapshot, and
# the frames it sends the agent after HELLO_ACK up to its START
_CATCH_ARGV = r"""
import json, logging, runpy, sys
import kvmpod.agent.session as session
out, frames_out = sys.argv[1], sys.argv[2]
send, recording = session.AgentSession.send, [True]
async def recording_send(self, frame):
    if recording[0] and frame.type.name not in ("THAW", "HELLO_ACK"):
        with open(frames_out, "ab") as f:
            f.write(frame.encode())
        recording[0] = frame.type.name != "START"
    await send(self, frame)
session.AgentSession.send = recording_send
class Catch(logging.Handler):
    def emit(self, record):
        if record.msg == "qemu argv: %s" and "-incoming" in record.args[0]:
            with open(out, "w") as f:
                json.dump(record.args[0], f)
spawn_log = logging.getLogger("kvmpod.vm.spawn")
spawn_log.setLevel(logging.DEBUG)
spawn_log.propagate = False
spawn_log.addHandler(Catch())
sys.argv = ["kvmpod", *sys.argv[3:]]
runpy.run_module("kvmpod", run_name="__main__")
"""


def build_harness() -> Path:
    """build/bench/restore-floor, by the Makefile's rule (the agent's generated protocol files first)."""
    subprocess.run(["make", "-s", "-C", str(REPO), "restore-floor"], check=True, stdout=subprocess.DEVNULL)
    return HARNESS


def _fd(argv: list[str], chardev: str) -> int:
    for word in argv:
        m = re.fullmatch(rf"socket,id={chardev},fd=(\d+)", word)
        if m:
            return int(m.group(1))
    raise Unavailable(f"kvmpod's restore argv has no {chardev} channel on an fd (agent transport not serial?)")


def harness_argv(work: Path, aci: Path, env: dict[str, str]) -> tuple[list[str], Path, Path]:
    """The restore floor's command line, from the QEMU argv of a real `kvmpod run --keep` (and that
    pod's directory, whose console.log the argv names; the caller removes it), and the file of the
    frames that run sent between HELLO_ACK and START (for the harness's --frames)."""
    caught, frames = work / "restore-argv.json", work / "kvmpod-frames.bin"
    caught.unlink(missing_ok=True)
    frames.unlink(missing_ok=True)
    pods = Path(env["KVMPOD_RUN_DIR"]) / "pods"
    before = set(pods.glob("*")) if pods.exists() else set()
    done = subprocess.run([sys.executable, "-c", _CATCH_ARGV, str(caught), str(frames), "run", "--keep", str(aci)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"kvmpod run --keep failed: {done.stderr.strip()}")
    (pod,) = set(pods.glob("*")) - before
    if not caught.exists():
        raise Unavailable("kvmpod run did not start from a boot snapshot (see its --debug output)")
    qemu = json.loads(caught.read_text())
    qmp, agent, restore = _fd(qemu, "qmp"), _fd(qemu, "agent"), _fd(qemu, "restore")
    state_fd = max(qmp, agent, restore) + 1
    memory = next(m.group(1) for w in qemu if (m := re.search(r"mem-path=([^,]+)", w)))
    serial = next(m.group(1) for w in qemu if (m := re.search(r"serial=([^,]+)", w)))
    argv = [str(build_harness()), "--qmp-fd", str(qmp), "--agent-fd", str(agent), "--restore-fd", str(restore),
            "--state-fd", str(state_fd), "--state", str(Path(memory).parent / "state"),
            "--restore-commands", restore_commands(state_fd).decode(), "--disk", serial,
            "--qemu-log", str(work / "restore-floor-qemu.log"), "--", *qemu]
    return argv, pod, frames


def run_harness(argv: list[str]) -> tuple[float, dict[str, float]]:
    """One restore-floor run: its wall time, and its own phases (s from spawn)."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"restore-floor failed: {done.stderr.strip()}")
    words = done.stdout.split()
    return wall, {words[i]: float(words[i + 1]) for i in range(0, len(words), 2)}


def kept_phases(aci: Path, env: dict[str, str]) -> dict[str, float]:
    """One `kvmpod run --keep` on the floor's phase boundaries: before QEMU's spawn (Python start, imports,
    planning), spawn to the agent's HELLO, to the app's EXIT, to the process's exit."""
    pods = Path(env["KVMPOD_RUN_DIR"]) / "pods"
    before = set(pods.glob("*")) if pods.exists() else set()
    began = time.time()
    subprocess.run([*KVMPOD, "run", "--keep", str(aci)], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    ended = time.time()
    (pod,) = set(pods.glob("*")) - before
    t = json.loads((pod / "state.json").read_text())["timings"]
    shutil.rmtree(pod)
    return {"before_spawn": t["qemu_spawn"] - began, "hello": t["agent_ready"] - t["qemu_spawn"],
            "exit": t["apps_exited"] - t["qemu_spawn"], "end": ended - t["qemu_spawn"]}


def measure_floor(work: Path, aci: Path, runs: int) -> dict:
    env = bench_env(work)
    cold = floor_vm(work)
    run_argv = [*KVMPOD, "run", str(aci)]
    timed(run_argv, env=env)  # the image's disk and boot snapshot made
    harness, pod, frames = harness_argv(work, aci, env)
    with_frames = [*harness[:1], "--frames", str(frames), *harness[1:]]
    try:
        run_harness(harness)  # warm
        run_harness(with_frames)
        floor_t, run_t, cold_t, framed_t = [], [], [], []
        framed_phases: dict[str, list[float]] = {"hello": [], "exit": [], "end": [], "qemu_cpu": []}
        floor_phases: dict[str, list[float]] = {"hello": [], "exit": [], "end": [], "qemu_cpu": []}
        kvmpod_phases: dict[str, list[float]] = {"before_spawn": [], "hello": [], "exit": [], "end": []}
        for i in range(runs):
            wall, phases = run_harness(harness)
            floor_t.append(wall)
            for k in floor_phases:
                floor_phases[k].append(phases[k])
            run_t.append(timed(run_argv, env=env))
            wall, phases = run_harness(with_frames)
            framed_t.append(wall)
            for k in framed_phases:
                framed_phases[k].append(phases[k])
            cold_t.append(timed(cold.argv))
            if i < max(3, runs // 2):
                for k, v in kept_phases(aci, env).items():
                    kvmpod_phases[k].append(v)
    finally:
        shutil.rmtree(pod, ignore_errors=True)
    ratio = statistics.median(run_t) / statistics.median(floor_t)
    kv = {k: statistics.median(v) for k, v in kvmpod_phases.items()}
    fl = {k: statistics.median(v) for k, v in floor_phases.items()}
    ff = {k: statistics.median(v) for k, v in framed_phases.items()}
    note = (f"kvmpod before QEMU's spawn {kv['before_spawn']:.3f}s; spawn to HELLO {kv['hello']:.3f} vs "
            f"{fl['hello']:.3f}, HELLO to app exit {kv['exit'] - kv['hello']:.3f} vs {fl['exit'] - fl['hello']:.3f}, "
            f"teardown {kv['end'] - kv['exit']:.3f} vs {fl['end'] - fl['exit']:.3f}")
    return {"runs": runs, "restore_floor": stats(floor_t), "run": stats(run_t), "cold_floor": stats(cold_t),
            "restore_floor_kvmpod_frames": stats(framed_t),
            "restore_floor_s": floor_t, "run_s": run_t, "cold_floor_s": cold_t, "restore_floor_kvmpod_frames_s": framed_t,
            "restore_floor_phases_s": fl, "restore_floor_kvmpod_frames_phases_s": ff, "kvmpod_phases_s": kv, "ratio_median": ratio,
            "ratio_min": min(run_t) / min(floor_t),
            "targets": [target("kvmpod run vs restore floor", ratio, TARGET_RATIO, note=note)]}


def print_floor(result: dict) -> None:
    f, r, c = result["restore_floor"], result["run"], result["cold_floor"]
    print(f"{result['runs']} runs each, interleaved")
    print(f"{'':40}{'min':>8}{'median':>9}{'ratio':>8}")
    print(f"{'restore floor (C harness, same snapshot)':40}{f['min']:8.3f}{f['median']:9.3f}{1:8.2f}")
    print(f"{'kvmpod run /bin/true (snapshot)':40}{r['min']:8.3f}{r['median']:9.3f}"
          f"{r['median'] / f['median']:8.2f}")
    k = result["restore_floor_kvmpod_frames"]
    print(f"{'restore floor sending kvmpod frames':40}{k['min']:8.3f}{k['median']:9.3f}{k['median'] / f['median']:8.2f}")
    print(f"{'cold floor (bare QEMU boot)':40}{c['min']:8.3f}{c['median']:9.3f}{c['median'] / f['median']:8.2f}")
    print(f"ratio of minima {result['ratio_min']:.2f}")
    fl, ff, kv = (result["restore_floor_phases_s"], result["restore_floor_kvmpod_frames_phases_s"],
                  result["kvmpod_phases_s"])
    print(f"{'phases, medians (s)':40}{'floor':>8}{'frames':>9}{'kvmpod':>9}")
    print(f"{'before QEMU is spawned':40}{0:8.3f}{0:9.3f}{kv['before_spawn']:9.3f}")
    print(f"{'spawn to the agent HELLO':40}{fl['hello']:8.3f}{ff['hello']:9.3f}{kv['hello']:9.3f}")
    print(f"{'HELLO to the app EXIT':40}{fl['exit'] - fl['hello']:8.3f}{ff['exit'] - ff['hello']:9.3f}"
          f"{kv['exit'] - kv['hello']:9.3f}")
    print(f"{'app EXIT to the process exit':40}{fl['end'] - fl['exit']:8.3f}{ff['end'] - ff['exit']:9.3f}"
          f"{kv['end'] - kv['exit']:9.3f}")
    print(f"{'QEMU CPU time (user + system)':40}{fl['qemu_cpu']:8.3f}{ff['qemu_cpu']:9.3f}")


if __name__ == "__main__":
    raise SystemExit(section_main(__doc__ or "", measure_floor, print_floor, runs=5))
