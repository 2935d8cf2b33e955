"""Choosing the machine type and kernel command line for a guest kernel (shown by --debug).

microvm (virtio-mmio, no PCI, no legacy devices) boots ~0.15 s faster under TCG than pc, but needs a
kernel with everything built in: PVH entry (an ELF vmlinux), virtio-mmio, and ACPI for device
discovery and power-off. kvmpod's minimal kernel has them; the distro kernel's virtio-mmio is a module
without command-line devices, so it gets pc with virtio-pci. Measurements: docs/kernel.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvmpod import paths
from kvmpod.boot import tsc
from kvmpod.boot.kernel import GuestKernel

# rtc stays on: without a CMOS clock this kernel polls for it for a whole second.
MICROVM_OPTIONS = ("x-option-roms=off", "pit=off", "pic=off", "rtc=on", "acpi=on")
# qboot: a minimal firmware for direct kernel boot on pc (SeaBIOS does far more than we need).
QBOOT = Path("/usr/share/qemu/qboot.rom")
# QEMU's emulated local APIC (and KVM's) counts at 1 GHz; the minimal kernel's lapic_timer_khz= patch
# takes this instead of calibrating for ~100 ms (kvmpod/boot/data/patches/0001-*).
LAPIC_TIMER_KHZ = 1_000_000


@dataclass(frozen=True)
class BootPlan:
    machine: str
    machine_options: tuple[str, ...]
    cmdline: str
    firmware: Path | None = None   # None: QEMU's default (microvm's is already qboot-based)

    @property
    def machine_arg(self) -> str:
        return ",".join((self.machine, *self.machine_options))


def microvm_capable(kernel: GuestKernel) -> bool:
    try:
        with kernel.image.open("rb") as f:
            is_elf = f.read(4) == b"\x7fELF"
    except OSError:
        return False
    return is_elf and all(kernel.option(o) == "y" for o in ("PVH", "VIRTIO_MMIO", "ACPI"))


def host_tsc_khz() -> int | None:
    """The host TSC rate, probed once per host boot and cached (keyed by the kernel's boot id)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    cache = paths.cache_dir() / "host-tsc-khz"
    try:
        cached_boot, khz_text = cache.read_text().split()
        if boot_id and cached_boot == boot_id:
            return int(khz_text)
    except (OSError, ValueError):
        pass
    khz = tsc.host_tsc_khz()  # spawns dmesg: once per host boot
    if khz and boot_id:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".host-tsc-khz.{os.getpid()}")
            tmp.write_text(f"{boot_id} {khz}\n")
            os.replace(tmp, cache)
        except OSError:
            pass
    return khz


def plan_boot(kernel: GuestKernel, cpus: int, debug: bool, accel: str = "tcg",
              extra_args: list[str] | None = None) -> BootPlan:
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
    machine = "pc"
    options: tuple[str, ...] = ()
    tsc_khz = host_tsc_khz() if accel == "tcg" else None
    if microvm_capable(kernel) and (accel != "tcg" or tsc_khz):
        machine, options = "microvm", MICROVM_OPTIONS
        if tsc_khz:
            args.append(f"tsc_early_khz={tsc_khz}")  # under TCG, ~30 % of microvm boots hang without it
    if kernel.kind == "minimal":
        args.append(f"lapic_timer_khz={LAPIC_TIMER_KHZ}")
    args.append("kvmpod.debug=1" if debug else "quiet")
    args += extra_args or []
    firmware = QBOOT if machine == "pc" and QBOOT.exists() else None
    return BootPlan(machine, options, " ".join(args), firmware)
