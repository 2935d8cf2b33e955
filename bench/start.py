#!/usr/bin/env python3
"""Start-time benchmark: `kvmpod run` of a trivial app against the floor, measured in the same run.

The floor is bare QEMU with the same kernel, machine, command line and initrd contents, whose /init
powers off at once: what no VM launcher can go below. kvmpod's figure is a cold `kvmpod` process with
warm caches (image disk and initrd already built), the way a user's second run is.

Usage: bench/start.py [--runs N]   (prints a table; not a test, asserts nothing)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvmpod.boot.initrd import build_initrd, find_agent  # noqa: E402
from kvmpod.boot.kernel import find_kernel  # noqa: E402
from kvmpod.vm.accel import choose_accelerator  # noqa: E402
from kvmpod.vm.config import VMConfig, qemu_argv  # noqa: E402
from kvmpod.vm.machine import plan_boot  # noqa: E402


def timed(argv: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def build_floor_init(work: Path) -> Path:
    init = work / "poweroff-init"
    cc = "musl-gcc" if subprocess.run(["which", "musl-gcc"], capture_output=True).returncode == 0 else "gcc"
    subprocess.run([cc, "-static", "-Os", "-o", str(init), str(REPO / "bench" / "poweroff-init.c")], check=True)
    return init


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    kernel = find_kernel()
    accel = choose_accelerator("auto")
    plan = plan_boot(kernel, cpus=1, debug=False, accel=accel.name)
    with tempfile.TemporaryDirectory(prefix="kvmpod-bench-") as tmp:
        work = Path(tmp)
        floor_initrd = build_initrd(build_floor_init(work), kernel)
        build_initrd(find_agent(), kernel)  # warm the cache kvmpod run uses
        floor_argv = qemu_argv(VMConfig(name="kvmpod-floor", kernel=kernel.image, initrd=floor_initrd,
                                        cmdline=plan.cmdline, console_log=work / "floor-console.log",
                                        machine=plan.machine, machine_options=plan.machine_options,
                                        accel=accel.name))
        rootfs = work / "rootfs"
        subprocess.run(["sh", str(REPO / "tests" / "make-busybox-rootfs.sh"), str(rootfs)], check=True)
        aci = work / "busybox.aci"
        kvmpod = [sys.executable, "-m", "kvmpod"]
        subprocess.run([*kvmpod, "image", "build", "--rootfs", str(rootfs), "--name", "bench/busybox",
                        "--exec", "/bin/true", "-o", str(aci)], check=True)
        run_argv = [*kvmpod, "run", str(aci)]
        env = {**os.environ, "KVMPOD_STORE_DIR": str(work / "store")}  # leave the real store alone
        timed(run_argv, env=env)  # warm: image disk built, store filled

        floor, run = [], []
        for _ in range(args.runs):  # interleaved, so host noise hits both alike
            floor.append(timed(floor_argv))
            run.append(timed(run_argv, env=env))

    print(f"kernel {kernel.kind} {kernel.version}, machine {plan.machine_arg}, accel {accel.name}, {args.runs} runs each")
    print(f"{'':24}{'min':>8}{'median':>9}")
    print(f"{'floor (bare QEMU)':24}{min(floor):8.3f}{statistics.median(floor):9.3f}")
    print(f"{'kvmpod run /bin/true':24}{min(run):8.3f}{statistics.median(run):9.3f}")
    print(f"{'ratio run/floor':24}{min(run) / min(floor):8.2f}{statistics.median(run) / statistics.median(floor):9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
