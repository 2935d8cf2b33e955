"""Running a pod in this process, in the foreground or detached: the one entry every door uses (the CLI's
`kvmpod run`, the Python API's worker, rkt's stage1 `run`).

The two halves of a foreground run meet here. Planning (launch.py) imports nothing heavy, and may
spawn QEMU from a boot snapshot before it returns; only then are the second half (run.py) and with it
asyncio, qemu.qmp and the agent session imported, while QEMU initialises. These two imports are the
pod runtime's only function-local imports of kvmpod's own modules, and that is why. Like the CLI's
import of a command, they run with the cyclic GC paused (kvmpod/startup.py).
"""

from __future__ import annotations

import time

from kvmpod.pod.launch import plan_pod
from kvmpod.pod.options import RunOptions
from kvmpod.pod.spec import AppOverrides
from kvmpod.startup import imports_without_gc
from kvmpod.store.locks import SharedLocks


def run(apps: list[AppOverrides], options: RunOptions) -> int:
    """Plan and run a pod; its exit status. Detached: once its apps run, with the pod in a child."""
    if options.detach:
        with imports_without_gc():
            from kvmpod.pod.detach import run_detached  # the second half, in a forked child (detach.py)

        return run_detached(apps, options)
    timings = {"start": time.time()}
    with SharedLocks() as claims:  # the pod's images stay in the store until the pod is gone
        plan = plan_pod(apps, options, claims, timings)
        with imports_without_gc():
            import asyncio  # only now: QEMU may be starting meanwhile

            from kvmpod.pod.run import run_planned
        return asyncio.run(run_planned(plan, options, timings, claims))
