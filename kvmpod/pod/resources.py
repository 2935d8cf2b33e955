"""Sizing the pod's VM from the apps' resource isolators (spec/ace.md: resource/memory, resource/cpu).

A VM is the pod's resource envelope, so the limits of its apps decide its size (docs/executor.md):
* memory: the sum of the apps' `resource/memory` limits (an app without one counts
  DEFAULT_APP_MEMORY) plus GUEST_OVERHEAD for the guest kernel, the agent and the page cache of the
  rootfs overlays; with no memory isolator at all, the default pod size (256 MiB).
* vCPUs: the sum of the apps' `resource/cpu` limits rounded up (an app without one counts one
  vCPU's worth only if no app has a limit), at least 1, at most the host's CPUs.
* Pod-level isolators (PodManifest `isolators`) bound the sum: apps asking for more are an error.
* `--memory` / `--cpus` given on the command line win; a notice says when they undercut the limits.
* Without flags or isolators: `[run] memory` and `[run] cpus` in kvmpod.toml (a CI runner's own
  defaults, docs/ci.md), else 256 MiB and 1 vCPU.
* The CPU time the pod may use (`cpu_limit`, the cgroup's cpu.max: kvmpod/vm/cgroup.py limits_for) is
  the apps' `resource/cpu` limits as they are (500m: half a CPU), else the pod's, else --cpus.
Quantities use the Kubernetes notation the spec refers to: 500m, 2, 1G (10^9), 512Mi (2^20).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from kvmpod import config as settings
from kvmpod.errors import UsageError
from kvmpod.image.manifest import Isolator

MIB = 1 << 20
DEFAULT_POD_MEMORY_MIB = 256
DEFAULT_APP_MEMORY_MIB = 128
GUEST_OVERHEAD_MIB = 64
MIN_MEMORY_MIB = 64

_SUFFIXES: dict[str, Decimal | int] = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
             "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]{0,2})$")


def parse_quantity(text: str) -> Decimal:
    """A resource quantity as a number (bytes for memory, cores for CPU)."""
    m = _QUANTITY.match(text.strip())
    if not m or m.group(2) not in _SUFFIXES:
        raise ValueError(f"{text!r} is not a resource quantity (like 500m, 2, 1G or 512Mi)")
    try:
        return Decimal(m.group(1)) * _SUFFIXES[m.group(2)]
    except InvalidOperation as e:
        raise ValueError(f"{text!r} is not a resource quantity") from e


@dataclass(frozen=True)
class AppResources:
    name: str
    memory_bytes: Decimal | None    # resource/memory limit
    cpus: Decimal | None            # resource/cpu limit


def app_resources(name: str, isolators: list[Isolator]) -> AppResources:
    return AppResources(name, _limit(isolators, "resource/memory", name), _limit(isolators, "resource/cpu", name))


def _limit(isolators: list[Isolator], kind: str, owner: str) -> Decimal | None:
    for isolator in isolators:
        if isolator.name == kind and isinstance(isolator.value, dict) and "limit" in isolator.value:
            try:
                return parse_quantity(str(isolator.value["limit"]))
            except ValueError as e:
                raise UsageError(f"{owner}: {kind} limit: {e}") from e
    return None


@dataclass(frozen=True)
class VMSize:
    memory_mib: int
    cpus: int
    reason: str             # how it was decided, for --debug and the docs
    notices: tuple[str, ...] = ()
    cpu_limit: Decimal | None = None   # the CPU time the pod may use, in CPUs: the apps' resource/cpu
                                       # limits (bounded by the pod's), or --cpus; None: no limit asked for


def size_vm(apps: list[AppResources], pod: AppResources | None = None, *, memory_mib: int | None = None,
            cpus: int | None = None, host_cpus: int | None = None) -> VMSize:
    """The VM size for `apps` (see the module docstring); explicit `memory_mib`/`cpus` win."""
    host_cpus = host_cpus or os.cpu_count() or 1
    notices: list[str] = []
    limited = [a.memory_bytes for a in apps if a.memory_bytes is not None]
    wanted_bytes = sum(limited, Decimal(0))
    if pod and pod.memory_bytes is not None and wanted_bytes > pod.memory_bytes:
        raise UsageError(f"the apps' resource/memory limits ({_mib(wanted_bytes)} MiB) exceed the pod's "
                         f"({_mib(pod.memory_bytes)} MiB)")
    if limited:
        derived_mem = (_mib(wanted_bytes) + DEFAULT_APP_MEMORY_MIB * (len(apps) - len(limited))
                       + GUEST_OVERHEAD_MIB)
        if pod and pod.memory_bytes is not None:
            derived_mem = min(derived_mem, _mib(pod.memory_bytes) + GUEST_OVERHEAD_MIB)
        mem_reason = f"app memory limits {_mib(wanted_bytes)} MiB + {GUEST_OVERHEAD_MIB} MiB guest overhead"
    elif pod and pod.memory_bytes is not None:
        derived_mem = _mib(pod.memory_bytes) + GUEST_OVERHEAD_MIB
        mem_reason = "pod memory limit + guest overhead"
    elif (found := settings.lookup("memory", "run")) is not None:
        derived_mem = -(-settings.size_setting("memory", "run", 0) // MIB)
        mem_reason = found.describe("[run] memory")
    else:
        derived_mem, mem_reason = DEFAULT_POD_MEMORY_MIB, "default"
    derived_mem = max(derived_mem, MIN_MEMORY_MIB)

    cpu_limited = [a.cpus for a in apps if a.cpus is not None]
    wanted_cpus = sum(cpu_limited, Decimal(0))
    if pod and pod.cpus is not None and wanted_cpus > pod.cpus:
        raise UsageError(f"the apps' resource/cpu limits ({wanted_cpus} CPUs) exceed the pod's ({pod.cpus})")
    cpu_limit: Decimal | None = None
    if cpu_limited:
        derived_cpus, cpu_reason = math.ceil(wanted_cpus), f"app cpu limits {wanted_cpus}"
        cpu_limit = wanted_cpus
    elif pod and pod.cpus is not None:
        derived_cpus, cpu_reason = math.ceil(pod.cpus), "pod cpu limit"
        cpu_limit = pod.cpus
    elif (found := settings.lookup("cpus", "run")) is not None:   # more than the host has: all it has
        derived_cpus = min(settings.int_setting("cpus", "run", 1), host_cpus)
        cpu_reason = found.describe("[run] cpus")
    else:
        derived_cpus, cpu_reason = 1, "default"
    if derived_cpus > host_cpus:
        notices.append(f"the apps' cpu limits ask for {derived_cpus} vCPUs; this host has {host_cpus}")
        derived_cpus = host_cpus
    derived_cpus = max(derived_cpus, 1)

    if memory_mib is not None:
        if limited and memory_mib < derived_mem:
            notices.append(f"--memory {memory_mib}M is below the {derived_mem} MiB the apps' memory limits need")
        derived_mem, mem_reason = memory_mib, "--memory"
    if cpus is not None:
        derived_cpus, cpu_reason, cpu_limit = cpus, "--cpus", Decimal(cpus)
    if cpu_limit is not None:   # more CPU time than vCPUs is no limit: the vCPUs bound it already
        cpu_limit = min(cpu_limit, Decimal(derived_cpus))
    return VMSize(derived_mem, derived_cpus, f"memory: {mem_reason}; cpus: {cpu_reason}", tuple(notices),
                  cpu_limit)


def _mib(n: Decimal) -> int:
    return math.ceil(n / MIB)
