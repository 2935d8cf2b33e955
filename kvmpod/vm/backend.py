"""The interface a VM backend offers the pod code (direct QEMU now; libvirt later).

The pod code never sees QEMU: it asks a backend to boot a VMConfig, gets the agent channel
as an asyncio stream pair, and learns how the VM ended.
"""

from __future__ import annotations

import abc
import asyncio
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class VMExit:
    """How a VM ended, as far as the host can tell."""

    returncode: int | None           # QEMU's exit status; negative = killed by that signal
    panicked: bool = False           # GUEST_PANICKED seen (pvpanic)
    shutdown_reason: str | None = None   # from the QMP SHUTDOWN event: guest-shutdown, guest-reset, host-qmp-quit...
    stderr_tail: str = ""
    failure: str = ""                # kvmpod ended the VM itself because the guest broke a device it emulates,
                                     # or the kernel did for its cgroup's memory limit (over_limit)
    over_limit: bool = False         # QEMU was OOM-killed in its cgroup (kvmpod/vm/cgroup.py)

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.panicked and not self.failure

    def describe(self) -> str:
        if self.failure:
            return self.failure
        if self.panicked:
            return "the guest kernel panicked"
        if self.returncode == -signal.SIGSYS:  # QEMU's -sandbox kills the process on a denied call
            return "QEMU was killed by its seccomp sandbox (SIGSYS): it made a system call the sandbox denies"
        if self.returncode is not None and self.returncode < 0:
            return f"QEMU was killed by signal {-self.returncode}"
        if self.shutdown_reason == "guest-reset":
            return "the guest reset itself"
        if self.returncode:
            detail = f": {self.stderr_tail}" if self.stderr_tail else ""
            return f"QEMU exited with status {self.returncode}{detail}"
        return "the guest powered off"


AgentChannel = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class VMBackend(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> AgentChannel:
        """Boot the VM; return once its agent channel is connected. Raises VMError."""

    @abc.abstractmethod
    async def wait(self) -> VMExit:
        """Wait until the VM has ended."""

    @property
    @abc.abstractmethod
    def ended(self) -> asyncio.Future[VMExit]:
        """Resolves when the VM ends, for racing against other work."""

    @abc.abstractmethod
    async def stop(self, grace: float) -> VMExit:
        """End the VM: ask politely (up to `grace` seconds), then kill it. Idempotent."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop the VM's vCPUs (the guest and its apps freeze where they are). Raises VMError."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Let the vCPUs of a paused VM run again. Raises VMError."""

    async def release_translations(self) -> bool:
        """Software emulation: drop the code translated so far and give its memory back to the host
        (a quiet pod keeps only what it runs again). False where the backend or its hypervisor cannot;
        never raises: the pod runs on either way."""
        return False

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The hypervisor process id, for the pod state file."""
