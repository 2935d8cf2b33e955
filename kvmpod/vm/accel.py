"""Choosing the accelerator: KVM only where a standard guest kernel can really run on it.

A PVM-only /dev/kvm (module kvm_pvm, no vmx/svm) accepts KVM_CREATE_VM, yet a standard guest
kernel hangs early under it, so such hosts must use TCG (software emulation) like hosts without
/dev/kvm. See ../shared/machine-facts.md for the measurements behind this.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmpod.errors import VMError


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

    @classmethod
    def probe(cls, root: Path = Path("/")) -> "HostFacts":
        dev = root / "dev/kvm"
        try:
            cpuinfo = (root / "proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
        modules = root / "sys/module"
        return cls(
            dev_kvm_exists=dev.exists(),
            dev_kvm_usable=dev.exists() and os.access(dev, os.R_OK | os.W_OK),
            cpu_virt_flags=bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.M)),
            hw_kvm_module=(modules / "kvm_intel").exists() or (modules / "kvm_amd").exists(),
            pvm_module=(modules / "kvm_pvm").exists(),
        )


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
    return Accelerator("kvm", "hardware virtualization available")
