"""A running virtiofsd (the shares and their argv: virtiofs.py). Started by the pod's runner under its
event loop, which is why this half is apart: planning describes the shares without importing asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

from kvmpod.errors import VMError
from kvmpod.vm.cgroup import Cgroup
from kvmpod.vm.cgroup import join as join_cgroup
from kvmpod.vm.spawn import die_with_parent
from kvmpod.vm.virtiofs import SOCKET_WAIT, FsShare, find_virtiofsd, id_map, pidfile, virtiofsd_argv

log = logging.getLogger(__name__)


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise VMError(f"virtiofsd's socket {path}: {e.strerror}") from e
    return sock


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
        # a virtiofsd running as a volume's owner may not write in the pod directory (nor its pid file
        # in /run/virtiofsd): kvmpod makes its listening socket and hands it over (--fd)
        listener = _listen(self.share.socket) if self.share.owner else None
        argv = virtiofsd_argv(find_virtiofsd(), self.share, listener.fileno() if listener else None)
        log.debug("virtiofsd argv: %s", argv)
        try:
            with open(self.log_path, "ab") as err:
                try:
                    self._proc = await asyncio.create_subprocess_exec(
                        *argv, stdin=asyncio.subprocess.PIPE if self.share.owner else asyncio.subprocess.DEVNULL,
                        stdout=err, stderr=err, pass_fds=(listener.fileno(),) if listener else (),
                        preexec_fn=functools.partial(_preexec, self.cgroup.procs_files if self.cgroup else ()),
                        start_new_session=True)
                except subprocess.SubprocessError as e:   # the preexec function failed: joining the cgroup
                    raise VMError(f"virtiofsd could not join the pod's cgroup "
                                  f"{self.cgroup.name if self.cgroup else ''}: it was removed or is not writable") from e
        finally:
            if listener is not None:
                listener.close()   # virtiofsd's now
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOCKET_WAIT
        if self.share.owner is not None:
            await self._map_owner(deadline)
        while not self.share.socket.exists():  # virtiofsd makes the socket: nothing to listen on first
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise VMError(f"virtiofsd for {self.share.source} did not start: {self._tail()}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), 0.01)

    async def _map_owner(self, deadline: float) -> None:
        """The user namespace's id maps (virtiofs.id_map), once its shell has made it; then the shell
        may become virtiofsd. Written as root in kvmpod's own namespace: no newuidmap, no subuid."""
        assert self._proc is not None and self._proc.stdin is not None and self.share.owner is not None
        loop = asyncio.get_running_loop()
        uid, gid = self.share.owner
        ours = os.readlink("/proc/self/ns/user")
        proc = Path(f"/proc/{self._proc.pid}")
        try:
            while True:   # until `unshare --user` has unshared (then it execs the shell, same pid)
                if self._proc.returncode is not None or loop.time() > deadline:
                    raise VMError(f"virtiofsd for {self.share.source}: its user namespace was not made: {self._tail()}")
                with contextlib.suppress(FileNotFoundError):
                    if os.readlink(proc / "ns/user") != ours:
                        break
                await asyncio.sleep(0.002)
            (proc / "uid_map").write_text(id_map(uid))
            (proc / "gid_map").write_text(id_map(gid))
            self._proc.stdin.write(b"\n")
            await self._proc.stdin.drain()
            self._proc.stdin.close()
        except (OSError, VMError) as e:
            await self.stop()
            if isinstance(e, VMError):
                raise
            raise VMError(f"virtiofsd for {self.share.source}: mapping the volume's owner {uid}:{gid}: "
                          f"{e.strerror}") from e

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
