"""A running virtiofsd (the shares and their argv: virtiofs.py). Started by the pod's runner under its
event loop, which is why this half is apart: planning describes the shares without importing asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from kvmpod.errors import VMError
from kvmpod.vm.spawn import die_with_parent
from kvmpod.vm.virtiofs import SOCKET_WAIT, FsShare, find_virtiofsd, virtiofsd_argv

log = logging.getLogger(__name__)


class Virtiofsd:
    """One running virtiofsd. Dies with kvmpod (PR_SET_PDEATHSIG), in its own session like QEMU."""

    def __init__(self, share: FsShare, log_path: Path):
        self.share = share
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        argv = virtiofsd_argv(find_virtiofsd(), self.share)
        log.debug("virtiofsd argv: %s", argv)
        with open(self.log_path, "ab") as err:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err,
                preexec_fn=die_with_parent, start_new_session=True)
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
        """SIGTERM, then SIGKILL after a second; always waited for, so nothing is left behind."""
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), 1.0)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.share.socket.unlink()
