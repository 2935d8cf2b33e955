#!/usr/bin/env python3
"""The libvirt backend's cost (docs/libvirt.md): `kvmpod run --backend libvirt /bin/true` against the
QEMU backend (from its boot snapshot, the default, and booted cold) and the floor (bare QEMU), and an
idle pod's memory on each backend, interleaved in the same run so host noise hits all alike.

The libvirt daemon: the machine's if qemu:///system answers, else one started here with sockets of its
own (and virtlogd), stopped after, as the tests do (tests/e2e/libvirt/conftest.py).

Usage: bench/backends.py [--runs N]   (run_all.py runs it as its "libvirt" section; needs root)
"""

from __future__ import annotations

import contextlib
import grp
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KVMPOD, REPO, Unavailable, bench_env, floor_vm, idle_pod, pss_kib, section_main, stats, timed  # noqa: E402




def _answers(uri: str) -> bool:
    return subprocess.run(["virsh", "-q", "-c", uri, "version"], capture_output=True, timeout=60).returncode == 0


def _pss_of(pidfile: Path) -> int:
    try:
        return pss_kib(int(pidfile.read_text()))
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def libvirt_daemon(work: Path):
    """(URI, libvirtd's pid file or None when the machine's daemon serves)."""
    if os.geteuid() != 0 or shutil.which("libvirtd") is None or importlib.util.find_spec("libvirt") is None:
        raise Unavailable("needs root, libvirtd (make libvirt-deps) and libvirt-python (.[libvirt])")
    kvm, restore = Path("/dev/kvm"), None
    with contextlib.suppress(KeyError, OSError):   # as udev would: else libvirt probes QEMU on every call
        gid = grp.getgrnam("kvm").gr_gid
        st = kvm.stat()
        if st.st_gid != gid:
            restore = (st.st_uid, st.st_gid, st.st_mode & 0o7777)
            os.chown(kvm, 0, gid)
            os.chmod(kvm, 0o660)
    started: list[Path] = []
    reaper = None
    try:
        if _answers("qemu:///system"):
            yield "qemu:///system", Path("/run/libvirtd.pid")
            return
        d = work / "libvirt"
        d.mkdir()
        if not Path("/run/libvirt/virtlogd-sock").exists():
            subprocess.run(["virtlogd", "-d", "-p", str(d / "virtlogd.pid")], check=True)
            started.append(d / "virtlogd.pid")
        (d / "libvirtd.conf").write_text(f'unix_sock_dir = "{d}"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
                                         'log_outputs = "3:stderr"\n')
        # under tests/reaper.py: where PID 1 reaps orphans late, libvirt would report every end late
        reaper = subprocess.Popen([sys.executable, str(REPO / "tests" / "reaper.py"), "libvirtd", "-d", "-f",
                          str(d / "libvirtd.conf"), "-p", str(d / "libvirtd.pid")], start_new_session=True)
        started.append(d / "libvirtd.pid")
        uri = f"qemu:///system?socket={d}/libvirt-sock"
        deadline = time.monotonic() + 60
        while not _answers(uri):
            if time.monotonic() > deadline:
                raise Unavailable("the libvirtd started here does not answer")
            time.sleep(0.2)
        yield uri, d / "libvirtd.pid"
    finally:
        for pidfile in reversed(started):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
        if reaper is not None:
            reaper.wait(timeout=30)
        time.sleep(1)
        if restore is not None:
            os.chown(kvm, restore[0], restore[1])
            os.chmod(kvm, restore[2])


def measure_libvirt(work: Path, aci: Path, runs: int, memory_runs: int = 3) -> dict:
    os.chmod(work, 0o711)   # libvirt's QEMU user opens the kernel copy and the store's images itself
    with libvirt_daemon(work) as (uri, daemon_pid):
        env = bench_env(work)
        floor = floor_vm(work)
        argvs = {"qemu": [*KVMPOD, "run", str(aci)], "qemu_cold": [*KVMPOD, "run", "--boot", "cold", str(aci)],
                 "libvirt": [*KVMPOD, "run", "--backend", "libvirt", "--libvirt-uri", uri, str(aci)]}
        for argv in argvs.values():   # warm: disk, store, boot snapshot, libvirt's QEMU capabilities
            timed(argv, env=env)
        times: dict[str, list[float]] = {"floor": [], **{k: [] for k in argvs}}
        for _ in range(runs):
            times["floor"].append(timed(floor.argv))
            for name, argv in argvs.items():
                times[name].append(timed(argv, env=env))
        pss: dict[str, list[int]] = {"qemu": [], "qemu_cold": [], "libvirt": []}
        kvmpod_pss: dict[str, list[int]] = {"qemu": [], "qemu_cold": [], "libvirt": []}
        daemons: list[int] = []
        for _ in range(memory_runs):
            for name, run_args in (("qemu", ()), ("qemu_cold", ("--boot", "cold")),
                                   ("libvirt", ("--backend", "libvirt", "--libvirt-uri", uri))):
                # the QEMU backend's idle pod is held by kvmpod-relay (same pid); a libvirt pod stays in kvmpod
                idle_env = env if name != "libvirt" else {**env, "KVMPOD_RELAY": "off"}
                with idle_pod(idle_env, aci, run_args) as (proc, state, _host):
                    pss[name].append(pss_kib(state["qemu_pid"]))
                    kvmpod_pss[name].append(pss_kib(proc.pid))
                    if name == "libvirt":
                        daemons.append(_pss_of(daemon_pid))
    result: dict = {"runs": runs, "memory_runs": memory_runs, "uri": uri, "machine": floor.machine,
                    "start": {k: stats(v) for k, v in times.items()}, "start_s": times,
                    "idle_qemu_pss_kib": {k: statistics.median(v) for k, v in pss.items()},
                    "idle_kvmpod_pss_kib": {k: statistics.median(v) for k, v in kvmpod_pss.items()},
                    "libvirtd_pss_kib": statistics.median(daemons) if daemons else 0}
    return result


def print_libvirt(result: dict) -> None:
    s, f = result["start"], result["start"]["floor"]["median"]
    print(f"{result['runs']} runs each, interleaved; libvirt at {result['uri']}; machine {result['machine']}")
    print(f"{'':44}{'min':>8}{'median':>9}{'ratio':>8}")
    for label, key in (("floor (bare QEMU)", "floor"), ("kvmpod run /bin/true (QEMU, snapshot)", "qemu"),
                       ("kvmpod run --boot cold (QEMU)", "qemu_cold"), ("kvmpod run --backend libvirt", "libvirt")):
        print(f"{label:44}{s[key]['min']:8.3f}{s[key]['median']:9.3f}{s[key]['median'] / f:8.2f}")
    q, k = result["idle_qemu_pss_kib"], result["idle_kvmpod_pss_kib"]
    print(f"idle pod PSS MiB, QEMU: {q['qemu'] / 1024:.1f} (QEMU backend, snapshot), {q['qemu_cold'] / 1024:.1f} "
          f"(QEMU backend, cold), {q['libvirt'] / 1024:.1f} (libvirt); the pod's kvmpod (kvmpod-relay once quiet): "
          f"{k['qemu'] / 1024:.1f}, {k['qemu_cold'] / 1024:.1f}, {k['libvirt'] / 1024:.1f}; "
          f"libvirtd itself {result['libvirtd_pss_kib'] / 1024:.1f} (per host, not per pod)")


def main() -> int:
    return section_main(__doc__, measure_libvirt, print_libvirt)


if __name__ == "__main__":
    raise SystemExit(main())
