"""virtiofsd: one daemon per host volume, started before QEMU and gone with the pod (docs/volumes.md).

QEMU 7.2's /usr/lib/qemu/virtiofsd (the C version) exports exactly one directory per instance,
sandboxed into it (mount namespace + pivot_root), and serves one vhost-user socket. kvmpod listens
on nothing here: virtiofsd creates the socket and QEMU connects to it, so kvmpod waits for the socket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvmpod.errors import VMError

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


def fuse_opt_value(value: object) -> str:
    """`value` as one value inside a `-o` list of virtiofsd (libfuse's fuse_opt syntax, which the C
    virtiofsd carries): the list splits at commas, and a backslash takes the next character literally
    (`\\,` is a comma, `\\\\` a backslash; an unescaped `\\NNN` would be an octal byte)."""
    return str(value).replace("\\", "\\\\").replace(",", "\\,")


def virtiofsd_argv(binary: Path, share: FsShare) -> list[str]:
    # The guest mounts a readOnly volume ro (and binds it ro); the host side is below.
    # --socket-path=... is one argument, not an option list: it is passed as it is.
    # Its sandbox (docs/security.md): sandbox=namespace (new mount, pid and net namespaces, pivot_root
    # into the share) and, always, its seccomp allowlist and a reduced capability set, from which
    # modcaps takes CAP_MKNOD (a guest could otherwise make device nodes on the host's filesystem) and
    # CAP_SETFCAP (file capabilities: xattrs are off anyway).
    argv = [str(binary), f"--socket-path={share.socket}", "-o", f"source={fuse_opt_value(share.source)}",
            "-o", "cache=auto", "-o", "sandbox=namespace", "-o", "no_posix_lock", "-o", "log_level=warn",
            "-o", "modcaps=-mknod:-setfcap", "--rlimit-nofile=4096"]
    if share.read_only:
        # The C virtiofsd has no read-only mode, and a guest that remounts the volume read-write (root
        # with CAP_SYS_ADMIN in the guest) would write the host's files. So it serves a read-only bind
        # of the source, made in a mount namespace of its own (unshare execs sh, sh execs virtiofsd:
        # the same pid), which its sandbox's own bind and pivot_root keep: the host refuses the
        # writes (EROFS). The source is an argument of sh, never part of its script.
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind -o ro -- "$1" "$1" && shift && exec "$@"', "kvmpod-ro-volume", str(share.source),
                *argv]
    return argv
