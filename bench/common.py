"""Helpers shared by the benchmarks (bench/run_all.py and its sections): the floor VM, the busybox ACI,
timing, an idle pod and its PSS. Not a test module; asserts nothing."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kvmpod.boot.initrd import build_initrd, find_agent  # noqa: E402
from kvmpod.boot.kernel import find_kernel  # noqa: E402
from kvmpod.vm.accel import choose_accelerator  # noqa: E402
from kvmpod.vm.config import VMConfig, qemu_argv  # noqa: E402
from kvmpod.vm.spawn import qemu_binary  # noqa: E402
from kvmpod.vm.machine import plan_boot  # noqa: E402

KVMPOD = [sys.executable, "-m", "kvmpod"]


class Unavailable(Exception):
    """A section cannot be measured on this machine (what it needs is missing): said, not failed."""


def section_main(doc: str, measure: Callable[[Path, Path, int], dict], show: Callable[[dict], None],
                 runs: int = 10) -> int:
    """`python bench/SECTION.py [--runs N]`: one section alone, on the busybox image, in a temp dir."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=runs)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmpod-bench-") as tmp:
        work = Path(tmp)
        try:
            show(measure(work, build_busybox_aci(work), args.runs))
        except Unavailable as e:
            print(f"skipped: {e}")
    return 0


def target(name: str, measured: float, limit: float, *, unit: str = "x", higher_is_better: bool = False,
           note: str = "") -> dict:
    """One of issue 22's targets as a section reports it: the measured figure, the limit, and whether it
    is met. run_all.py collects every section's "targets" list and prints them in one table, met or not:
    a target missed is shown with its figure, never dropped."""
    met = measured >= limit if higher_is_better else measured <= limit
    return {"target": name, "measured": measured, "limit": limit, "unit": unit,
            "higher_is_better": higher_is_better, "met": met, "note": note}


def timed(argv: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def build_floor_init(work: Path) -> Path:
    init = work / "poweroff-init"
    if not init.exists():
        cc = "musl-gcc" if subprocess.run(["which", "musl-gcc"], capture_output=True).returncode == 0 else "gcc"
        subprocess.run([cc, "-static", "-Os", "-o", str(init), str(REPO / "bench" / "poweroff-init.c")],
                       check=True)
    return init


@dataclass
class Floor:
    """Bare QEMU with kvmpod's kernel, machine and cmdline; its /init powers off at once."""
    kernel: object
    machine: str
    accel: str
    argv: list[str]


def floor_vm(work: Path, kernel_kind: str | None = None) -> Floor:
    """The floor for `kernel_kind` (None: the default kernel). Also warms the initrd cache kvmpod uses."""
    kernel = find_kernel(kernel_kind)
    accel = choose_accelerator("auto")
    plan = plan_boot(kernel, cpus=1, debug=False, accel=accel.name)
    floor_initrd = build_initrd(build_floor_init(work), kernel)
    build_initrd(find_agent(), kernel)  # warm the cache kvmpod run uses
    argv = qemu_argv(VMConfig(name="kvmpod-floor", kernel=kernel.image, initrd=floor_initrd,
                              cmdline=plan.cmdline, console_log=work / f"floor-{kernel.kind}-console.log",
                              machine=plan.machine, machine_options=plan.machine_options,
                              firmware=plan.firmware, accel=accel.name), str(qemu_binary()))
    return Floor(kernel, plan.machine_arg, accel.name, argv)


def build_busybox_aci(work: Path) -> Path:
    """A busybox ACI (exec /bin/true) built with the project's own tools."""
    aci = work / "busybox.aci"
    if not aci.exists():
        rootfs = work / "rootfs"
        subprocess.run(["sh", str(REPO / "tests" / "make-busybox-rootfs.sh"), str(rootfs)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([*KVMPOD, "image", "build", "--rootfs", str(rootfs), "--name", "bench/busybox",
                        "--exec", "/bin/true", "-o", str(aci)], check=True, stdout=subprocess.DEVNULL)
    return aci


def bench_env(work: Path) -> dict[str, str]:
    """Environment for kvmpod: a private store and run dir, so the real ones are left alone, and pods
    without a network (the floor has none, and root's default, the kvmpod0 bridge, would change the
    host's network; a benchmark that wants one passes --net)."""
    config = work / "config" / "kvmpod" / "kvmpod.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('[net]\ndefault = "none"\n')
    return {**os.environ, "KVMPOD_STORE_DIR": str(work / "store"), "KVMPOD_RUN_DIR": str(work / "run"),
            "XDG_CONFIG_HOME": str(work / "config"), "KVMPOD_SNAPSHOT_DIR": str(work / "snapshots")}


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


def measure_start(work: Path, aci: Path, runs: int, kernel_kind: str | None = None) -> dict:
    """Floor vs `kvmpod run ACI` (/bin/true), from its boot snapshot (the default) and booted cold,
    interleaved so host noise hits all alike."""
    floor = floor_vm(work, kernel_kind)
    run_argv = [*KVMPOD, "run", *(["--kernel", kernel_kind] if kernel_kind else []), str(aci)]
    cold_argv = [*run_argv[:-1], "--boot", "cold", str(aci)]
    env = bench_env(work)
    timed(run_argv, env=env)  # warm: image disk built, store filled, boot snapshot made
    timed(cold_argv, env=env)
    floor_t, run_t, cold_t = [], [], []
    for _ in range(runs):
        floor_t.append(timed(floor.argv))
        run_t.append(timed(run_argv, env=env))
        cold_t.append(timed(cold_argv, env=env))
    return {"kernel": f"{floor.kernel.kind} {floor.kernel.version}", "machine": floor.machine,
            "accel": floor.accel, "runs": runs, "floor": stats(floor_t), "run": stats(run_t),
            "run_cold": stats(cold_t), "floor_s": floor_t, "run_s": run_t, "run_cold_s": cold_t}


def print_start(result: dict) -> None:
    f, r, c = result["floor"], result["run"], result["run_cold"]
    print(f"kernel {result['kernel']}, machine {result['machine']}, accel {result['accel']}, "
          f"{result['runs']} runs each")
    print(f"{'':34}{'min':>8}{'median':>9}{'ratio':>8}")
    print(f"{'floor (bare QEMU)':34}{f['min']:8.3f}{f['median']:9.3f}{1:8.2f}")
    print(f"{'kvmpod run /bin/true (snapshot)':34}{r['min']:8.3f}{r['median']:9.3f}{r['median'] / f['median']:8.2f}")
    print(f"{'kvmpod run --boot cold':34}{c['min']:8.3f}{c['median']:9.3f}{c['median'] / f['median']:8.2f}")


# -- an idle pod, as the memory benchmarks see it ------------------------------------------------------

def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def wait_state(state_file: Path, want: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(state_file.read_text())
            if state.get("state") == want:
                return state
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{state_file} never reached state {want!r}")


def wait_host(state_file: Path, timeout: float) -> str:
    """The process that holds the idle pod once it is quiet: kvmpod-relay after ~1 s (docs/relay.md),
    or kvmpod itself if the relay is off or not built."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if json.loads(state_file.read_text()).get("host_process") == "kvmpod-relay":
                return "kvmpod-relay"
        time.sleep(0.05)
    return "kvmpod"


@contextlib.contextmanager
def idle_pod(env: dict[str, str], aci: Path, run_args: tuple[str, ...] = ()):
    """A running `kvmpod run [run_args] … sleep 30` once it is idle: (its process, state.json, the host process)."""
    pods = Path(env["KVMPOD_RUN_DIR"]) / "pods"
    before = set(pods.glob("*")) if pods.exists() else set()
    proc = subprocess.Popen([*KVMPOD, "run", *run_args, str(aci), "--exec", "/bin/sleep", "--", "30"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (new := set(pods.glob("*")) - before if pods.exists() else set()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("pod directory never appeared")
            time.sleep(0.02)
        (pod,) = new
        state = wait_state(pod / "state.json", "running", 30)
        host = wait_host(pod / "state.json", 10 if env.get("KVMPOD_RELAY") != "off" else 1.5)
        time.sleep(0.5)  # let the idle pod settle
        yield proc, state, host
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the second signal kills the VM
            proc.wait(timeout=10)
