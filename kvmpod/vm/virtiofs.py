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
    # PermissionError: the directory is root's (0700) and kvmpod runs as a user, whose pods never had a
    # virtiofsd (host volumes go over 9p without root), so none of its pid files can be there
    with contextlib.suppress(FileNotFoundError, PermissionError):
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
    owner: tuple[int, int] | None = None   # the host uid and gid the guest's root is (id_map), None: root


ID_RANGE = 65536   # the guest ids an owner mapping covers: 0-65535


def id_map(outer: int) -> str:
    """/proc/PID/uid_map (or gid_map) text for virtiofsd in a user namespace of its own: the guest's
    root (inside id 0) is `outer` on the host, every other id is itself, except `outer`, which has no
    inside id left (files the host's `outer` owns show as the guest's root)."""
    ranges = [(0, outer, 1), (1, 1, outer - 1), (outer + 1, outer + 1, ID_RANGE - outer - 1)]
    return "".join(f"{inside} {host} {count}\n" for inside, host, count in ranges if count > 0)



def userns_wrapper(uid: int, gid: int) -> list[str]:
    """What puts virtiofsd in a user namespace of its own whose root is uid:gid on the host (`owner`):
    the process becomes uid:gid (no other groups; its death signal set again, which the change of
    user clears), makes the namespace, and its shell waits for kvmpod to write the id maps, which must
    come before virtiofsd starts; then it becomes virtiofsd, root in the namespace (the same pid
    throughout: kvmpod signals and waits for it as ever)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--pdeathsig=SIGKILL",
            "unshare", "--user", "--", "sh", "-c", 'read _ && exec "$@" </dev/null', "kvmpod-volume-owner"]


def fuse_opt_value(value: object) -> str:
    """`value` as one value inside a `-o` list of virtiofsd (libfuse's fuse_opt syntax, which the C
    virtiofsd carries): the list splits at commas, and a backslash takes the next character literally
    (`\\,` is a comma, `\\\\` a backslash; an unescaped `\\NNN` would be an octal byte)."""
    return str(value).replace("\\", "\\\\").replace(",", "\\,")


def virtiofsd_argv(binary: Path, share: FsShare, listen_fd: int | None = None) -> list[str]:
    """`listen_fd`: the listening socket kvmpod made (--fd), else virtiofsd makes share.socket."""
    # The guest mounts a readOnly volume ro (and binds it ro); the host side is below.
    # --socket-path=... is one argument, not an option list: it is passed as it is.
    # Its sandbox (docs/security.md): sandbox=namespace (new mount, pid and net namespaces, pivot_root
    # into the share) and, always, its seccomp allowlist and a reduced capability set, from which
    # modcaps takes CAP_MKNOD (a guest could otherwise make device nodes on the host's filesystem) and
    # CAP_SETFCAP (file capabilities: xattrs are off anyway).
    socket = f"--fd={listen_fd}" if listen_fd is not None else f"--socket-path={share.socket}"
    argv = [str(binary), socket, "-o", f"source={fuse_opt_value(share.source)}",
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
    if share.owner is not None:
        # The C virtiofsd has no uid mapping either: it runs as the owner, in a user namespace whose
        # root that owner is (Virtiofsd.start writes the maps), so what the guest's root writes is the
        # owner's, and its sandbox's capabilities hold in that namespace only (docs/volumes.md).
        argv = [*userns_wrapper(*share.owner), *argv]
    return argv
