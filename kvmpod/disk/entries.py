"""The rootfs of an image as a stream of validated entries, read from a tar or a directory tree.

Nothing is extracted: a tar is read member by member and a directory tree is walked with lstat.
Everything that could escape the rootfs or that the disk cannot represent is refused here, with a
one-line error naming the offending path:

* ImageError (the image is malformed or unsafe): absolute names, '..' components, duplicate paths,
  entries whose parent path goes through a symlink (or a non-directory) of the archive, hard links
  whose target is outside the rootfs or not an earlier regular file, empty symlink targets,
  entries outside `rootfs/` other than the top-level `manifest`, unknown tar member types.
* DiskError (valid, but the rootfs disk cannot hold it): device nodes, FIFOs, files of 4 GiB or
  more. See docs/disk.md for why.

Paths are str; names that are not valid UTF-8 are carried as surrogate escapes
(`os.fsdecode` style: bytes 0x80-0xff that do not decode become U+DC80-U+DCFF) and are written back
to the disk as the original bytes.
"""

from __future__ import annotations

import enum
import math
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, cast

from kvmpod.errors import DiskError, ImageError, printable

# The largest file that fits in one ISO 9660 extent as pycdlib lays it out (4 GiB - 2 KiB: a
# directory record's 32-bit data length, rounded down to whole 2 KiB blocks). Anything bigger would
# need a multi-extent file, which we do not support (docs/disk.md explains why).
MAX_FILE_SIZE = 0xFFFFF800

MAX_PATH_BYTES = 4095            # PATH_MAX less the NUL
MAX_NAME_BYTES = 253             # what the guest's ISO 9660 driver reads from a Rock Ridge NM record
MAX_SYMLINK_TARGET_BYTES = 4095  # PATH_MAX: what readlink(2) can return
MAX_ID = 0xFFFFFFFF              # Rock Ridge PX uid/gid are 32-bit

ROOT_PATH = "."
"""The `path` of the entry that carries the attributes of the rootfs root directory itself."""

_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


class EntryKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"


@dataclass(frozen=True, slots=True)
class RootfsEntry:
    """One entry of a rootfs.

    `path` is rootfs-relative, '/'-separated, normalised (no '', '.' or '..' components, no leading
    or trailing '/'), and never ''. The root directory itself is implicit (mode 0755, owned by 0:0);
    a DIR entry whose path is "." (ROOT_PATH) gives it other attributes. A DIR entry may repeat the
    path of a directory an earlier entry implied (see entries_from_tar): it then sets that
    directory's attributes.

    FILE: `size` bytes, read by calling `opener` (lazily, at most once, when the disk is written).
    SYMLINK: `link_target` is the target verbatim (absolute, relative or dangling).
    HARDLINK: `link_target` is the path of an earlier FILE entry. A hard link is another name for
    that file's inode, so the disk gives it the file's mode, owner and mtime; its own are ignored.
    """

    path: str
    kind: EntryKind
    mode: int
    uid: int
    gid: int
    mtime: float
    size: int = 0
    link_target: str = ""
    opener: Callable[[], BinaryIO] | None = None


def check_representable(shown: str, path: str, uid: int, gid: int, mtime: float) -> None:
    """Refuse what the rootfs disk (and the guest) cannot represent, at import rather than at first run:
    paths beyond PATH_MAX (which also bounds the depth, and so the work, of a hostile path), names
    beyond the guest driver's limit, ids beyond 32 bits, times that are not finite numbers."""
    encoded = encode_name(path)
    if len(encoded) > MAX_PATH_BYTES:
        raise ImageError(f"{shown[:200]}…: path longer than {MAX_PATH_BYTES} bytes (PATH_MAX)")
    for part in encoded.split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            raise DiskError(f"{shown}: names longer than {MAX_NAME_BYTES} bytes are not supported by the "
                            f"guest's ISO 9660 driver (this one is {len(part)})")
    for what, value in (("uid", uid), ("gid", gid)):
        if not 0 <= value <= MAX_ID:
            raise DiskError(f"{shown}: {what} {value} is out of range (0-{MAX_ID})")
    if not math.isfinite(mtime):
        raise ImageError(f"{shown}: mtime {mtime} is not a finite time")


def check_symlink_target(shown: str, target: str) -> None:
    if len(encode_name(target)) > MAX_SYMLINK_TARGET_BYTES:
        raise DiskError(f"{shown}: symlink targets longer than {MAX_SYMLINK_TARGET_BYTES} bytes are not supported")


def check_file_size(shown: str, size: int) -> None:
    """Refuse a file the disk cannot hold in one extent; `shown` is the path used in the message."""
    if size > MAX_FILE_SIZE:
        raise DiskError(
            f"{shown}: files of 4 GiB or more are not supported in the rootfs disk "
            f"(size {size} exceeds the single-extent limit of {MAX_FILE_SIZE} bytes)"
        )


def _parents(path: str) -> Iterator[str]:
    """The proper ancestors of a rootfs path, outermost first ("a/b/c" -> "a", "a/b")."""
    pos = path.find("/")
    while pos != -1:
        yield path[:pos]
        pos = path.find("/", pos + 1)


def _normalise_archive_name(name: str, shown: str, what: str = "paths") -> str:
    """An archive name with '' and '.' components dropped; absolute names and '..' are refused."""
    if name.startswith("/"):
        raise ImageError(f"{shown}: absolute {what} are not allowed in an image")
    parts = name.split("/")
    if ".." in parts:
        raise ImageError(f"{shown}: '..' components are not allowed in image {what}")
    if "\x00" in name:
        raise ImageError(f"{shown}: NUL bytes are not allowed in image {what}")
    return "/".join(p for p in parts if p and p != ".")


def _member_kind(member: tarfile.TarInfo, shown: str) -> EntryKind:
    if member.isreg():  # REGTYPE, AREGTYPE, CONTTYPE and GNU sparse files
        return EntryKind.FILE
    if member.isdir():
        return EntryKind.DIR
    if member.issym():
        return EntryKind.SYMLINK
    if member.islnk():
        return EntryKind.HARDLINK
    if member.ischr() or member.isblk():
        raise DiskError(f"{shown}: device nodes are not supported in the rootfs disk")
    if member.isfifo():
        raise DiskError(f"{shown}: FIFOs are not supported in the rootfs disk")
    raise ImageError(f"{shown}: unsupported tar entry type {member.type!r}")


def entries_from_tar(tar: tarfile.TarFile, prefix: str = "rootfs/", *, implied_dirs: bool = True,
                     lower_links: bool = False,
                     on_manifest: Callable[[tarfile.TarInfo], None] | None = None) -> Iterator[RootfsEntry]:
    """The rootfs entries of an image tar, in archive order, validated (see the module docstring).

    Only members under `prefix` are the rootfs (the ACI layout is `manifest` + `rootfs/`); the
    top-level `manifest` file (and a directory entry for the archive root itself, as `tar -C dir .`
    writes) are skipped, anything else outside `prefix` is an ImageError. With prefix "" the whole
    archive is the rootfs. Directories that members need but that the archive does not list (tar
    tools often omit them) are yielded as implied DIR entries: mode 0755, owner 0:0, the mtime of
    the member that needed them; a later explicit entry for such a directory is yielded again and
    sets its attributes.

    `tar` must have been opened from a seekable, uncompressed file that stays open until the disk is
    written: FILE openers call `tar.extractfile` lazily (and may be called again). Nothing is read
    beyond the member headers here, so a member whose header claims a size the disk cannot hold is
    refused before any data.

    For a tar that is one layer of several (kvmpod.image.layers.merge_layers):
    * implied_dirs=False: directories the archive does not list are not yielded (they are still
      checked), so that they do not reset the attributes a lower layer gave them.
    * lower_links=True: a hard link may name a path this archive does not hold at all (a file of a
      lower layer, which the merge checks); its link_target is that path, and later links to it
      name the link itself.
    `on_manifest` is called with the top-level `manifest` member, so that one pass over the headers
    both checks the rootfs and finds the manifest (kvmpod/image/aci.py).
    """
    pfx = _normalise_archive_name(prefix, prefix or "prefix")
    kinds: dict[str, EntryKind] = {}  # every path seen so far (explicit or implied) -> its kind
    implied: set[str] = set()  # directories yielded only because a member needed them
    inode_of: dict[str, str] = {}  # FILE and HARDLINK paths -> the FILE path holding the data
    root_seen = manifest_seen = False
    checked_parent = None  # the last parent directory found valid: archives are mostly in tree order

    def rootfs_path(arc: str) -> str | None:
        """The rootfs path of a normalised archive name, "." for the root, None if outside."""
        if not pfx:
            return arc or ROOT_PATH
        if arc == pfx:
            return ROOT_PATH
        if arc.startswith(pfx + "/"):
            return arc[len(pfx) + 1:]
        return None

    for member in _members(tar):
        shown = printable(member.name)
        arc = _normalise_archive_name(member.name, shown)
        path = rootfs_path(arc)
        if path is None:
            if arc == "manifest":
                if not member.isreg():
                    raise ImageError(f"{shown}: the image manifest must be a regular file")
                if manifest_seen:
                    raise ImageError(f"{shown}: duplicate entry")
                manifest_seen = True
                if on_manifest is not None:
                    on_manifest(member)
                continue
            if arc == "" and member.isdir():
                continue  # "./": the archive's own top directory
            raise ImageError(f"{shown}: entry outside {pfx}/ (an image holds only 'manifest' and '{pfx}/')")

        kind = _member_kind(member, shown)
        mode, uid, gid, mtime = member.mode & 0o7777, member.uid, member.gid, member.mtime
        check_representable(shown, path, uid, gid, mtime)

        if path == ROOT_PATH:
            if kind is not EntryKind.DIR:
                raise ImageError(f"{shown}: the rootfs itself must be a directory")
            if root_seen:
                raise ImageError(f"{shown}: duplicate entry")
            root_seen = True
            yield RootfsEntry(ROOT_PATH, EntryKind.DIR, mode, uid, gid, mtime)
            continue

        if path in kinds:
            if kind is EntryKind.DIR and path in implied:
                implied.discard(path)  # the archive lists the directory after its contents
                yield RootfsEntry(path, EntryKind.DIR, mode, uid, gid, mtime)
                continue
            raise ImageError(f"{shown}: duplicate entry")

        parent = path.rpartition("/")[0]
        if parent and parent != checked_parent:
            for ancestor in _parents(path):
                ancestor_kind = kinds.get(ancestor)
                if ancestor_kind is None:
                    kinds[ancestor] = EntryKind.DIR
                    implied.add(ancestor)
                    if implied_dirs:
                        yield RootfsEntry(ancestor, EntryKind.DIR, 0o755, 0, 0, mtime)
                elif ancestor_kind is EntryKind.SYMLINK:
                    raise ImageError(
                        f"{shown}: its parent {_shown_path(pfx, ancestor)} is a symlink; "
                        "entries may not be written through symlinks"
                    )
                elif ancestor_kind is not EntryKind.DIR:
                    raise ImageError(f"{shown}: its parent {_shown_path(pfx, ancestor)} is not a directory")
            checked_parent = parent

        if kind is EntryKind.FILE:
            check_file_size(shown, member.size)
            entry = RootfsEntry(path, kind, mode, uid, gid, mtime, size=member.size,
                                opener=partial(_open_member, tar, member))
            inode_of[path] = path
        elif kind is EntryKind.DIR:
            entry = RootfsEntry(path, kind, mode, uid, gid, mtime)
        elif kind is EntryKind.SYMLINK:
            if not member.linkname:
                raise ImageError(f"{shown}: symlink with an empty target")
            check_symlink_target(shown, member.linkname)
            entry = RootfsEntry(path, kind, mode, uid, gid, mtime, link_target=member.linkname)
        else:  # HARDLINK
            link_shown = printable(member.linkname) or "''"
            target_arc = _normalise_archive_name(member.linkname, f"{shown} -> {link_shown}",
                                                 "hard link targets")
            target = rootfs_path(target_arc)
            if target is None or target == ROOT_PATH:
                raise ImageError(f"{shown}: hard link target {link_shown} is outside {pfx or 'the rootfs'}/")
            data_path = inode_of.get(target)
            if data_path is None and lower_links and target not in kinds:
                # A file of a lower layer (the merge checks it). This archive may still replace that
                # path, so later links to this one name this link rather than the lower path.
                entry = RootfsEntry(path, kind, mode, uid, gid, mtime, link_target=target)
                inode_of[path] = path
            elif data_path is None:
                raise ImageError(
                    f"{shown}: hard link target {link_shown} is not an earlier regular file of the image"
                )
            else:
                entry = RootfsEntry(path, kind, mode, uid, gid, mtime, link_target=data_path)
                inode_of[path] = data_path

        kinds[path] = kind
        yield entry


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of `tar`, read one header at a time; a corrupt archive is an ImageError."""
    it = iter(tar)
    while True:
        try:
            member = next(it)
        except StopIteration:
            return
        except (tarfile.TarError, EOFError, OSError, ValueError, OverflowError) as e:
            # ValueError/OverflowError: tarfile's parsing of malformed PAX and GNU sparse headers
            where = os.fsdecode(tar.name) if tar.name else "image"
            raise ImageError(f"{where}: corrupt or truncated tar archive: {printable(str(e))}") from e
        # tarfile keeps every header it reads in tar.members; nothing here looks a member up again
        # (regular files are read by offset), so drop them: a million-entry archive stays small.
        tar.members.clear()  # type: ignore[attr-defined]  # TarFile.members is real, typeshed omits it
        yield member


def _shown_path(pfx: str, path: str) -> str:
    return f"{pfx}/{path}" if pfx else path


def _open_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> BinaryIO:
    fileobj = tar.extractfile(member)
    if fileobj is None:  # cannot happen for a regular file; keeps the type checker honest
        raise ImageError(f"{member.name}: has no file data")
    return cast(BinaryIO, fileobj)


def entries_from_dir(root: Path) -> Iterator[RootfsEntry]:
    """The entries of a plain directory tree, parents before children, names in byte order.

    The first entry is the root directory itself (path "."). Nothing is followed: symlinks are
    entries, hard links are found by (st_dev, st_ino) among files with st_nlink > 1, sockets are
    skipped silently (they are runtime objects and mean nothing in an image), device nodes and FIFOs
    are DiskErrors as in entries_from_tar.
    """
    root = Path(root)
    try:
        st = os.lstat(root)
    except OSError as e:
        raise DiskError(f"{root}: cannot read rootfs directory: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise DiskError(f"{root}: the rootfs must be a directory")
    yield RootfsEntry(ROOT_PATH, EntryKind.DIR, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime)

    first_link: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) -> path of the FILE entry
    stack: list[str] = [""]  # rootfs paths of the directories still to list (explicit stack: no depth limit)
    while stack:
        dir_path = stack.pop()
        dir_abs = os.path.join(root, dir_path) if dir_path else os.fspath(root)
        try:
            with os.scandir(dir_abs) as it:
                names = sorted((e.name for e in it), key=os.fsencode)
        except OSError as e:
            raise DiskError(f"{dir_abs}: cannot read directory: {e.strerror}") from e
        subdirs: list[str] = []
        for name in names:
            path = f"{dir_path}/{name}" if dir_path else name
            abs_path = os.path.join(dir_abs, name)
            try:
                st = os.lstat(abs_path)
            except OSError as e:
                raise DiskError(f"{abs_path}: cannot stat: {e.strerror}") from e
            fmt = stat.S_IFMT(st.st_mode)
            mode = stat.S_IMODE(st.st_mode)
            if fmt == stat.S_IFDIR:
                yield RootfsEntry(path, EntryKind.DIR, mode, st.st_uid, st.st_gid, st.st_mtime)
                subdirs.append(path)
            elif fmt == stat.S_IFREG:
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in first_link:
                    yield RootfsEntry(path, EntryKind.HARDLINK, mode, st.st_uid, st.st_gid, st.st_mtime,
                                      link_target=first_link[key])
                    continue
                check_file_size(abs_path, st.st_size)
                if st.st_nlink > 1:
                    first_link[key] = path
                yield RootfsEntry(path, EntryKind.FILE, mode, st.st_uid, st.st_gid, st.st_mtime,
                                  size=st.st_size, opener=partial(_open_file, abs_path))
            elif fmt == stat.S_IFLNK:
                try:
                    target = os.readlink(abs_path)
                except OSError as e:
                    raise DiskError(f"{abs_path}: cannot read symlink: {e.strerror}") from e
                yield RootfsEntry(path, EntryKind.SYMLINK, mode, st.st_uid, st.st_gid, st.st_mtime,
                                  link_target=target)
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                raise DiskError(f"{abs_path}: device nodes are not supported in the rootfs disk")
            elif fmt == stat.S_IFIFO:
                raise DiskError(f"{abs_path}: FIFOs are not supported in the rootfs disk")
            # sockets (and anything else lstat can report) are skipped
        stack.extend(reversed(subdirs))  # pop() then visits them in name order


def _open_file(path: str) -> BinaryIO:
    return open(path, "rb")  # closed by the disk writer once the data is copied


def encode_name(name: str) -> bytes:
    """The on-disk bytes of a path or name (the inverse of os.fsdecode on Linux)."""
    return name.encode(_ENCODING, _ERRORS)
