"""Choosing the machine type and kernel command line for a guest kernel."""

from __future__ import annotations

from dataclasses import dataclass

from kvmpod.boot.kernel import GuestKernel


@dataclass(frozen=True)
class BootPlan:
    machine: str
    cmdline: str


def plan_boot(kernel: GuestKernel, cpus: int, debug: bool, extra_args: list[str] | None = None) -> BootPlan:
    args = [
        "console=ttyS0",
        "panic=-1",               # a panic resets the guest; QEMU runs with -no-reboot, so it ends
        "cryptomgr.notests",      # crypto self-tests cost ~100 ms under TCG and protect nothing here
        "i8042.noaux", "i8042.nokbd", "i8042.nopnp",  # no keyboard/mouse: skip the PS/2 probe
        "random.trust_cpu=on",
        "no_timer_check",         # the IO-APIC timer check fails (panics) when many TCG guests share the CPUs
    ]
    if cpus == 1:
        args.append("noreplace-smp")  # skip SMP alternatives patching (~80 ms under TCG)
    if debug:
        args.append("kvmpod.debug=1")
    else:
        args.append("quiet")
    args += extra_args or []
    return BootPlan(machine="pc", cmdline=" ".join(args))
