"""The host's TSC frequency, for the guest kernel's ``tsc_early_khz=``: under TCG the guest TSC runs
at the host's rate, and without it ~30 % of microvm boots hang (kvmpod/vm/machine.py). Its own small
module: the boot plan needs it on every pod's start path, which the kernel build's module is not on.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

_DMESG_TSC = (re.compile(r"tsc: Refined TSC clocksource calibration: (\d+)\.(\d+) MHz"),
              re.compile(r"tsc: Detected (\d+)\.(\d+) MHz processor"))


def _mhz_to_khz(whole: str, frac: str) -> int:
    return int(whole) * 1000 + int((frac + "000")[:3])


def parse_tsc_khz(dmesg: str = "", cpuinfo: str = "") -> int | None:
    """The TSC kHz from kernel log text (refined calibration first), else /proc/cpuinfo's first
    "cpu MHz" if the CPU has a constant TSC (its "cpu MHz" is then the TSC rate on a VM host,
    and close to it on bare metal)."""
    for pattern in _DMESG_TSC:
        found = pattern.findall(dmesg)
        if found:
            return _mhz_to_khz(*found[-1])
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*(\d+)\.?(\d*)", cpuinfo, re.M)
    if flags and mhz and "constant_tsc" in flags.group(1).split():
        return _mhz_to_khz(mhz.group(1), mhz.group(2))
    return None


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz (for the guest's `tsc_early_khz=`), None if unknown.

    Sources, best first: /sys/devices/system/cpu/cpu0/tsc_freq_khz (some kernels/CPUs), the
    kernel log (`dmesg`, may be restricted for non-root), /proc/cpuinfo.
    """
    try:
        value = int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text().strip())
        if value > 0:
            return value
    except (OSError, ValueError):
        pass
    dmesg = ""
    try:
        proc = subprocess.run(["dmesg"], capture_output=True, text=True, errors="replace", timeout=5,
                              env=dict(os.environ, LC_ALL="C"))
        if proc.returncode == 0:
            dmesg = proc.stdout
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    return parse_tsc_khz(dmesg, cpuinfo)
