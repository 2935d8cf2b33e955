"""Choosing the accelerator: KVM only where a standard guest kernel can really run on it.

What /dev/kvm is on this host (kvm_kind):
  real    bare metal: vmx/svm in /proc/cpuinfo, kvm_intel or kvm_amd loaded, no `hypervisor` flag
  nested  this host is itself a VM (the `hypervisor` cpu flag) whose hypervisor passes vmx/svm
          through (nested virtualization): KVM works, a little slower than on bare metal
  pvm     a PVM-only /dev/kvm (module kvm_pvm, no vmx/svm): it accepts KVM_CREATE_VM, yet a standard
          guest kernel hangs early under it, so such hosts use TCG (software emulation)
  none    no /dev/kvm, one this user may not open, or no vmx/svm and no KVM module: TCG
See ../shared/machine-facts.md for the measurements behind the PVM case. The `nested` parameter
of kvm_intel/kvm_amd (/sys/module/kvm_*/parameters/nested) says whether this host's own guests
(the pods' VMs) could run KVM in turn; `kvmpod doctor` reports it (kvmpod/doctor.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmpod.errors import VMError


HW_MODULES = ("kvm_intel", "kvm_amd")


@dataclass(frozen=True)
class Accelerator:
    name: str          # "kvm" or "tcg"
    reason: str        # why; shown in the one-line notice when TCG is chosen automatically
    automatic: bool = True


@dataclass(frozen=True)
class HostFacts:
    """What the choice depends on, gathered in one place so tests can fake it."""

    dev_kvm_exists: bool
    dev_kvm_usable: bool
    cpu_virt_flags: bool      # vmx or svm in /proc/cpuinfo
    hw_kvm_module: bool       # kvm_intel or kvm_amd loaded
    pvm_module: bool          # kvm_pvm loaded
    in_guest: bool = False    # the `hypervisor` cpu flag: this host is itself a virtual machine
    hw_module: str = ""       # which of kvm_intel / kvm_amd is loaded ("" if neither)
    nested: bool | None = None  # that module's `nested` parameter (None: unknown, no such module)

    @classmethod
    def probe(cls, root: Path = Path("/")) -> "HostFacts":
        dev = root / "dev/kvm"
        try:
            cpuinfo = (root / "proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
        modules = root / "sys/module"
        hw_module = next((m for m in HW_MODULES if (modules / m).exists()), "")
        return cls(
            dev_kvm_exists=dev.exists(),
            dev_kvm_usable=dev.exists() and os.access(dev, os.R_OK | os.W_OK),
            cpu_virt_flags=_has_flag(cpuinfo, "vmx", "svm"),
            hw_kvm_module=bool(hw_module),
            pvm_module=(modules / "kvm_pvm").exists(),
            in_guest=_has_flag(cpuinfo, "hypervisor"),
            hw_module=hw_module,
            nested=_nested_parameter(modules / hw_module / "parameters/nested") if hw_module else None,
        )


def _has_flag(cpuinfo: str, *flags: str) -> bool:
    return bool(re.search(rf"^flags\s*:.*\b({'|'.join(flags)})\b", cpuinfo, re.M))


def _nested_parameter(path: Path) -> bool | None:
    """kvm_intel shows Y/N, kvm_amd 1/0 (older kernels 1/0 for both)."""
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return value in ("Y", "y", "1")


def kvm_kind(facts: HostFacts) -> str:
    """"real", "nested", "pvm" or "none" (the module docstring)."""
    if not facts.dev_kvm_exists or not facts.dev_kvm_usable:
        return "none"
    if facts.hw_kvm_module or facts.cpu_virt_flags:
        return "nested" if facts.in_guest else "real"
    return "pvm" if facts.pvm_module else "none"


def kvm_description(facts: HostFacts) -> str:
    """One line on what KVM is here, for `kvmpod doctor` and the choice's reason."""
    kind = kvm_kind(facts)
    module = facts.hw_module or ("vmx/svm in /proc/cpuinfo" if facts.cpu_virt_flags else "")
    if kind == "real":
        return f"real KVM ({module})"
    if kind == "nested":
        return (f"nested KVM ({module}): this host is itself a VM (the `hypervisor` cpu flag) "
                "and its hypervisor passes hardware virtualization through")
    if kind == "pvm":
        return "PVM-only /dev/kvm (kvm_pvm loaded, no vmx/svm)"
    return kvm_unusable_reason(facts) or "no KVM"


def nested_for_guests(facts: HostFacts) -> str | None:
    """Whether the pods' own guests could run KVM in turn (the module's `nested` parameter), or None
    when there is no kvm_intel/kvm_amd to ask."""
    if not facts.hw_module or facts.nested is None:
        return None
    state = "on" if facts.nested else "off"
    return f"{facts.hw_module} nested={state}: KVM inside a pod's VM is {'possible' if facts.nested else 'not possible'}"


def kvm_unusable_reason(facts: HostFacts) -> str | None:
    """None when KVM can run a standard guest kernel, else why not."""
    if not facts.dev_kvm_exists:
        return "/dev/kvm does not exist"
    if not facts.dev_kvm_usable:
        return "/dev/kvm is not readable and writable by this user"
    if facts.hw_kvm_module or facts.cpu_virt_flags:
        return None
    if facts.pvm_module:
        return "/dev/kvm is PVM-only (kvm_pvm loaded, no vmx/svm): a standard guest kernel hangs under it"
    return "the CPU has no vmx/svm and neither kvm_intel nor kvm_amd is loaded"


def choose_accelerator(requested: str = "auto", facts: HostFacts | None = None) -> Accelerator:
    if requested == "tcg":
        return Accelerator("tcg", "requested with --accel tcg", automatic=False)
    facts = facts or HostFacts.probe()
    reason = kvm_unusable_reason(facts)
    if requested == "kvm":
        if reason:
            raise VMError(f"--accel kvm: KVM cannot be used here: {reason}")
        return Accelerator("kvm", "requested with --accel kvm", automatic=False)
    if requested != "auto":
        raise VMError(f"--accel: unknown accelerator {requested!r} (choose kvm, tcg or auto)")
    if reason:
        return Accelerator("tcg", reason)
    return Accelerator("kvm", kvm_description(facts))
