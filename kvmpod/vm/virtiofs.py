"""virtiofsd: one daemon per host volume, started before QEMU and gone with the pod (docs/volumes.md).

QEMU 7.2's /usr/lib/qemu/virtiofsd (the C version) exports exactly one directory per instance,
sandboxed into it (mount namespace + pivot_root), and serves one vhost-user socket. kvmpod listens
on nothing here: virtiofsd creates the socket and QEMU connects to it, so kvmpod waits for the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from kvmpod.errors import VMError
from kvmpod.vm.spawn import die_with_parent

log = logging.getLogger(__name__)

VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
SOCKET_WAIT = 10.0


def find_virtiofsd() -> Path:
    for candidate in VIRTIOFSD_PATHS:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise VMError("virtiofsd not found (install qemu-system-common): host volumes need it")


@dataclass(frozen=True)
class FsShare:
    """One exported host directory: its virtio-fs tag and the vhost-user socket QEMU connects to."""
    tag: str
    source: Path
    socket: Path
    read_only: bool = False


def virtiofsd_argv(binary: Path, share: FsShare) -> list[str]:
    if "," in str(share.source):  # virtiofsd splits -o at commas: such a path would inject options
        raise VMError(f"{share.source}: a shared directory's path may not contain a comma")
    # The C virtiofsd has no read-only option: the guest mounts a readOnly volume ro (and binds it ro).
    return [str(binary), f"--socket-path={share.socket}", "-o", f"source={share.source}",
            "-o", "cache=auto", "-o", "sandbox=namespace", "-o", "no_posix_lock", "-o", "log_level=warn",
            "--rlimit-nofile=4096"]


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
