"""Spawning the QEMU process, with no event loop and no QMP library: `kvmpod run` starts QEMU before it
has imported either, so QEMU initialises (and a restored guest resumes) while kvmpod goes on.

kvmpod talks to QEMU over socketpairs, not socket paths: QEMU gets one end of each (`fd=`), kvmpod
keeps the other. There is no listener to set up first, no path to clean up or race on, and what QEMU
writes before kvmpod reads (the QMP greeting, the agent's first frame) waits in the socket. The
driving side is kvmpod/vm/qemu.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmpod import faults
from kvmpod.errors import VMError
from kvmpod.vm.cgroup import Cgroup
from kvmpod.vm.cgroup import join as join_cgroup
from kvmpod.vm.config import VMConfig, qemu_argv
from kvmpod.vm.hangup import DeathLine
from kvmpod.vm.qemu_binary import find_qemu

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_PR_SET_THP_DISABLE = 41

# A VM restored from a boot snapshot starts with -incoming defer and a second QMP monitor that is sent
# these commands at spawn time: QEMU runs them as soon as it is up, without a round trip to kvmpod.
# RAM is the snapshot's memory file, so the stream holds none (x-ignore-shared); the device state
# comes from an fd QEMU inherited.
RESTORE_ANSWERS = 3  # one "return" per command


def restore_commands(state_fd: int) -> bytes:
    commands = [
        {"execute": "qmp_capabilities"},
        {"execute": "migrate-set-capabilities",
         "arguments": {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}},
        {"execute": "migrate-incoming", "arguments": {"uri": f"fd:{state_fd}"}},
    ]
    return b"".join(json.dumps(c).encode() + b"\n" for c in commands)


def die_with_parent() -> None:
    # If kvmpod is killed (even with SIGKILL), QEMU must not outlive it.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def qemu_preexec(cgroup_procs: tuple[bytes, ...] = ()) -> None:
    """Runs in the QEMU child before exec: it joins the pod's cgroup first (`cgroup_procs`, its
    cgroup.procs files: kvmpod/vm/cgroup.py), so that nothing it allocates is charged outside the
    limits; it dies with kvmpod, and gets no transparent huge pages.
    QEMU asks for huge pages for TCG's code buffer, so on hosts with THP in "madvise" or "always" mode
    every 2 MiB of buffer it writes into is backed whole: an idle pod held 14 MiB for 12 of code.
    The flag is per process and survives exec; guest RAM from a file or memfd never used THP anyway."""
    import ctypes

    join_cgroup(cgroup_procs)
    die_with_parent()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)


@dataclass
class SpawnedQemu:
    """A running QEMU process and kvmpod's ends of its channels, until QemuVM takes them over."""

    process: subprocess.Popen
    config: VMConfig                      # as spawned: with the fds QEMU was given
    qmp: socket.socket | None
    agent: socket.socket | None           # the serial agent channel (None on vsock transports)
    restore_monitor: socket.socket | None  # only when restoring a boot snapshot
    cgroup: Cgroup | None = None          # the cgroup QEMU joined before it exec'd

    def take(self, name: str) -> socket.socket | None:
        """Our end of channel `name` ("qmp", "agent", "restore_monitor"), now the caller's to close."""
        sock = getattr(self, name)
        setattr(self, name, None)
        return sock

    def close(self) -> None:
        """Close the ends nobody took."""
        for name in ("qmp", "agent", "restore_monitor"):
            sock = self.take(name)
            if sock is not None:
                sock.close()

    def kill(self) -> None:
        """End QEMU and reap it, synchronously: for a pod that fails before it has an event loop."""
        if self.process.returncode is None:
            self.process.kill()
            self.process.wait()
        self.close()


def spawn_qemu(config: VMConfig, stderr_log: Path, restore_from: Path | None = None,
               binary: Path | None = None, cgroup: Cgroup | None = None) -> SpawnedQemu:
    """Start QEMU (`binary`, default: qemu_binary()) for `config`, in `cgroup` if given; with
    `restore_from` (a boot snapshot's device state, config.incoming) it loads that state and resumes the
    guest by itself. Raises VMError if QEMU cannot be started."""
    theirs: list[int] = []   # QEMU's ends: inherited, then closed here
    ours: dict[str, socket.socket] = {}
    try:
        fds = {}
        for channel, field in (("qmp", "qmp_fd"), ("agent", "agent_fd"), ("restore_monitor", "restore_monitor_fd")):
            if channel == "agent" and config.agent_transport != "serial":
                continue
            if channel == "restore_monitor" and restore_from is None:
                continue
            ours[channel], qemu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds[field] = qemu_end.detach()
            theirs.append(fds[field])
        if restore_from is not None:
            theirs.append(os.open(restore_from, os.O_RDONLY | os.O_CLOEXEC))
            ours["restore_monitor"].sendall(restore_commands(theirs[-1]))
        death = DeathLine()   # QEMU dies with this process, whatever user it has become (hangup.py)
        ours["death_line"] = death.kvmpod_end   # closed below if QEMU does not start
        theirs.append(death.qemu_fd)
        config = dataclasses.replace(config, qmp_fd=fds.get("qmp_fd", config.qmp_fd),
                                     agent_fd=fds.get("agent_fd", config.agent_fd),
                                     restore_monitor_fd=fds.get("restore_monitor_fd", config.restore_monitor_fd))
        argv = qemu_argv(config, str(binary or qemu_binary()))
        log.debug("qemu argv: %s", argv)
        with open(stderr_log, "wb") as err:
            try:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=qemu_env(),
                    preexec_fn=functools.partial(qemu_preexec, cgroup.procs_files if cgroup else ()),
                    pass_fds=[*theirs, *(n.tap_fd for n in config.nics if n.tap_fd is not None)],
                    start_new_session=True)  # Ctrl-C reaches kvmpod, which decides what the apps get
            except FileNotFoundError as e:
                raise VMError(f"{argv[0]}: not found (apt-get install qemu-system-x86)") from e
            except subprocess.SubprocessError as e:   # the preexec function failed: joining the cgroup
                raise VMError(f"QEMU could not join its cgroup {cgroup.name if cgroup else ''}: "
                              "it was removed or is not writable") from e
        death.arm(process.pid)
    except BaseException:
        for sock in ours.values():
            sock.close()
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    faults.at("spawn", process.pid)
    return SpawnedQemu(process, config, ours.get("qmp"), ours.get("agent"), ours.get("restore_monitor"), cgroup)


def qemu_env() -> dict[str, str]:
    """QEMU's environment: kvmpod's, with glibc's malloc held to one arena (unless the caller chose).
    Each of QEMU's threads (vCPU, I/O, RCU, workers) otherwise gets an arena of its own, and an idle
    pod keeps their touched pages: one arena is 1.3 MiB less per pod (16 idle pods: 492 -> 471 MiB PSS)
    with no change in start time or streaming measured (docs/performance.md)."""
    return {"MALLOC_ARENA_MAX": "1", **os.environ}


def qemu_binary() -> Path:
    """The QEMU binary the VMs run: kvmpod's own build or Debian's (kvmpod/vm/qemu_binary.py)."""
    return find_qemu().path


def check_socket_path(path: Path) -> None:
    """sockaddr_un holds 107 bytes of path: fail clearly now instead of with EINVAL later."""
    if len(os.fsencode(path)) >= 108:
        raise VMError(f"{path}: socket path too long for a unix socket (use a shorter runtime dir)")
