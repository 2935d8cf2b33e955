"""virtiofsd: one daemon per host volume, started before QEMU and gone with the pod (docs/volumes.md).

QEMU 7.2's /usr/lib/qemu/virtiofsd (the C version) exports exactly one directory per instance,
sandboxed into it (mount namespace + pivot_root), and serves one vhost-user socket. kvmpod listens
on nothing here: virtiofsd creates the socket and QEMU connects to it, so kvmpod waits for the socket.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from kvmpod.errors import VMError

VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
# Where the C virtiofsd (QEMU 7.2's) writes the pid file that guards its socket, and leaves it: one file
# per share, named after the socket's path, which nobody else would remove.
VIRTIOFSD_PIDFILE_DIR = Path("/run/virtiofsd")
SOCKET_WAIT = 10.0


def find_virtiofsd() -> Path:
    for candidate in VIRTIOFSD_PATHS:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise VMError("virtiofsd not found (install qemu-system-common): host volumes need it")


def pidfile(socket: Path) -> Path:
    """The pid file virtiofsd keeps for the share served on `socket`: the socket's absolute path with
    every / a dot (tools/virtiofsd/fuse_virtio.c of QEMU 7.2), in VIRTIOFSD_PIDFILE_DIR."""
    return VIRTIOFSD_PIDFILE_DIR / (str(socket.absolute()).replace("/", ".") + ".pid")


def remove_pidfiles(directory: Path) -> None:
    """The pid files of every share whose socket was in `directory` (a pod's: `kvmpod gc` and rm, after
    a virtiofsd that died with its kvmpod)."""
    prefix = str(directory.absolute()).replace("/", ".") + "."
    with contextlib.suppress(FileNotFoundError):
        for entry in VIRTIOFSD_PIDFILE_DIR.iterdir():
            if entry.name.startswith(prefix) and entry.name.endswith(".pid"):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


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
