"""A running virtiofsd (the shares and their argv: virtiofs.py). Started by the pod's runner under its
event loop, which is why this half is apart: planning describes the shares without importing asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import subprocess
from pathlib import Path

from kvmpod.errors import VMError
from kvmpod.vm.cgroup import Cgroup
from kvmpod.vm.cgroup import join as join_cgroup
from kvmpod.vm.spawn import die_with_parent
from kvmpod.vm.virtiofs import SOCKET_WAIT, FsShare, find_virtiofsd, pidfile, virtiofsd_argv

log = logging.getLogger(__name__)


def _preexec(cgroup_procs: tuple[bytes, ...]) -> None:
    """In the child before exec: into the pod's cgroup first, then die with kvmpod."""
    join_cgroup(cgroup_procs)
    die_with_parent()


class Virtiofsd:
    """One running virtiofsd. Dies with kvmpod (PR_SET_PDEATHSIG), in its own session like QEMU."""

    def __init__(self, share: FsShare, log_path: Path, cgroup: Cgroup | None = None):
        self.share = share
        self.log_path = log_path
        self.cgroup = cgroup   # the pod's, with its QEMU (kvmpod/vm/cgroup.py)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        argv = virtiofsd_argv(find_virtiofsd(), self.share)
        log.debug("virtiofsd argv: %s", argv)
        with open(self.log_path, "ab") as err:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err,
                    preexec_fn=functools.partial(_preexec, self.cgroup.procs_files if self.cgroup else ()),
                    start_new_session=True)
            except subprocess.SubprocessError as e:   # the preexec function failed: joining the cgroup
                raise VMError(f"virtiofsd could not join the pod's cgroup {self.cgroup.name if self.cgroup else ''}: "
                              "it was removed or is not writable") from e
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOCKET_WAIT
        while not self.share.socket.exists():  # virtiofsd makes the socket: nothing to listen on first
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise VMError(f"virtiofsd for {self.share.source} did not start: {self._tail()}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), 0.01)

    def _tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-2:]) or "no output"

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a second; always waited for, and its socket and pid file removed,
        so nothing is left behind."""
        if self._proc is None:
            return
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), 1.0)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                await self._proc.wait()
        for leftover in (self.share.socket, pidfile(self.share.socket)):   # virtiofsd leaves both
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
