"""Writing rootfs entries into an ISO 9660 + Rock Ridge disk image with pycdlib.

The layout (docs/disk.md has the reasons):

* Interchange level 4 (ISO 9660:1999): no directory depth limit, so deep trees need no Rock Ridge
  relocation. At levels 1-3 pycdlib would move every 8th directory level under an RR_MOVED
  directory in the root; Linux's isofs follows those CL/PL links, but the relocation directory
  would still show up as a stray top-level entry of the guest's rootfs. The level-4 "enhanced"
  volume descriptor is a supplementary descriptor that Linux ignores; it mounts the primary one,
  whose directory tree is the same.
* Rock Ridge 1.09 carries everything the guest sees: NM (the real names), PX (mode incl.
  setuid/setgid/sticky, uid, gid, link count), TF (mtime, short form: seconds, UTC), SL (symlink
  targets). The ISO 9660 names are generated, never derived from the real names: per directory a
  fixed-width hexadecimal counter (files get the ".;1" suffix ECMA-119 asks for), so they are
  unique, always valid, and sort in insertion order (pycdlib keeps children sorted; appending at the
  end keeps adding an entry O(1) instead of renumbering the directory).
* Dates are set from the entries, never from the clock, so the same entries give the same bytes.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import struct
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pycdlib
import pycdlib.dates
import pycdlib.pycdlibexception

from kvmpod import faults
from kvmpod.disk.entries import (MAX_ID, MAX_NAME_BYTES, MAX_SYMLINK_TARGET_BYTES, ROOT_PATH, EntryKind, RootfsEntry,
                                  check_file_size, encode_name)
from kvmpod.errors import DiskError, ImageError, KvmpodError


_ISO_NAME_WIDTH = 8  # hex digits of the generated ISO 9660 names: 2**32 entries per directory

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFLNK = 0o120000

# ISO 9660 directory record dates hold years 1900..2155.
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_MIN_TIME = int((_dt.datetime(1900, 1, 1, tzinfo=_dt.UTC) - _EPOCH).total_seconds())
_MAX_TIME = int((_dt.datetime(2155, 12, 31, 23, 59, 59, tzinfo=_dt.UTC) - _EPOCH).total_seconds())

_SECTOR = 2048
_VD_FIRST_SECTOR = 16
_VD_TYPE_TERMINATOR = 255
_VD_MODIFICATION_DATE_OFFSET = 830  # ECMA-119 8.4.27, same place in primary and supplementary VDs


@dataclass(frozen=True)
class IsoStats:
    files: int
    dirs: int  # not counting the root
    symlinks: int
    hardlinks: int
    data_bytes: int  # file data, each hard-linked file counted once
    iso_bytes: int


class _Name(str):
    """A name/target whose UTF-8 encoding round-trips surrogate escapes to the original bytes.

    pycdlib encodes Rock Ridge names and symlink targets with `str.encode('utf-8')`, which refuses
    the lone surrogates that stand for non-UTF-8 bytes; this str subclass makes that call return the
    raw bytes. Should a pycdlib version stop calling .encode on the object itself, non-UTF-8 names
    fail with a clear DiskError instead (see _pycdlib_call).
    """

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.encode(self, encoding, "surrogateescape")


@dataclass(slots=True)
class _Node:
    """What build_iso knows about one rootfs path."""

    kind: EntryKind
    iso_path: str
    rec: Any  # the pycdlib DirectoryRecord
    mode: int
    uid: int
    gid: int
    mtime: float
    parent: _Node | None = None
    next_name: int = 0  # DIR: counter for the generated ISO names of its children
    links: list[Any] = field(default_factory=list)  # FILE: records of its hard links


class _LazyData:
    """The file object pycdlib gets for a FILE: opens the entry's data only when pycdlib copies it.

    Opening every file up front would hold one descriptor (or one tar member buffer) per file until
    the whole ISO is written. This opens on the first read, closes as soon as `size` bytes are read,
    and refuses data that ends early (pycdlib would silently zero-fill it).
    """

    mode = "rb"  # pycdlib checks the file object is binary by its mode

    __slots__ = ("_fp", "_opener", "_path", "_pos", "_size")

    def __init__(self, path: str, size: int, opener: Callable[[], BinaryIO]):
        self._path = path
        self._size = size
        self._opener = opener
        self._fp: BinaryIO | None = None
        self._pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset != 0:
            raise DiskError(f"/{self._path}: internal error: unexpected seek to {offset}/{whence}")
        self.close()
        self._pos = 0
        return 0

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        want = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if want <= 0:
            return b""
        try:
            if self._fp is None:
                self._fp = self._opener()
            data = self._fp.read(want)
        except KvmpodError:
            raise
        except tarfile.TarError as e:
            raise ImageError(f"/{self._path}: cannot read the file data from the image: {e}") from e
        except OSError as e:
            raise DiskError(f"/{self._path}: cannot read the file data: {e.strerror or e}") from e
        if len(data) != want:
            raise DiskError(f"/{self._path}: file data ended after {self._pos + len(data)} of {self._size} bytes")
        self._pos += want
        if self._pos == self._size:
            self.close()
        return data

    def close(self) -> None:
        fp, self._fp = self._fp, None
        if fp is not None:
            fp.close()


def build_iso(entries: Iterable[RootfsEntry], out: Path, *, volume_id: str = "KVMPOD_ROOTFS") -> IsoStats:
    """Write `entries` as an ISO 9660 + Rock Ridge image at `out`, atomically.

    The ISO is written to a temporary file in out's directory, fsynced and renamed over `out`; on
    any failure the temporary file is removed and `out` is left as it was (normally: absent).
    Entries are validated again here (paths, duplicates, parents, sizes, name lengths), so any
    iterable of RootfsEntry is safe to pass.
    """
    out = Path(out)
    _check_volume_id(volume_id)
    # pycdlib allocates several objects per entry, none of which are garbage until the build ends;
    # the cyclic GC rescanning the growing heap made 40,000 files ~1.5x slower.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        builder = _Builder(volume_id)
        try:
            for entry in entries:
                builder.add(entry)
            builder.finish()
            iso_bytes = _write_atomically(builder, out)
        finally:
            builder.close()
    finally:
        if gc_was_enabled:
            gc.enable()
    return IsoStats(files=builder.files, dirs=builder.dirs, symlinks=builder.symlinks,
                    hardlinks=builder.hardlinks, data_bytes=builder.data_bytes, iso_bytes=iso_bytes)


def _write_atomically(builder: _Builder, out: Path) -> int:
    """Write the ISO to a temporary file next to `out`, fsync, rename; return its size."""
    try:
        # the writer's pid in the name: `image gc` and `image fsck` tell a live build's file from a dead one's
        fd, tmp_path = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise DiskError(f"{out}: cannot create the rootfs disk: {e.strerror}") from e
    renamed = False
    try:
        with os.fdopen(fd, "w+b") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it 0600; the disk is not secret
            builder.write(f)
            faults.at("disk")
            size = f.seek(0, os.SEEK_END)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, out)
        renamed = True
        _fsync_dir(out.parent)
    except BaseException as e:
        # Nothing may be left behind: not the temporary file, nor an `out` whose rename is not durable.
        try:
            os.unlink(out if renamed else tmp_path)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise DiskError(f"{out}: cannot write the rootfs disk: {e.strerror or e}") from e
        raise
    return size


def _check_volume_id(volume_id: str) -> None:
    # ECMA-119 8.4.6: up to 32 d-characters.
    if not volume_id or len(volume_id) > 32 or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_" for c in volume_id):
        raise DiskError(f"{volume_id!r}: an ISO volume ID is 1-32 characters from A-Z, 0-9 and _")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pycdlib_call(path: str, fn: Callable[..., Any], **kwargs: Any) -> None:
    try:
        fn(**kwargs)
    except pycdlib.pycdlibexception.PyCdlibException as e:
        raise DiskError(f"/{path}: cannot be added to the rootfs disk: {e}") from e
    except UnicodeError as cause:
        raise DiskError(f"/{path}: names that are not valid UTF-8 are not supported by this pycdlib version") from cause


class _Builder:
    def __init__(self, volume_id: str):
        self.iso = pycdlib.PyCdlib()
        self.iso.new(interchange_level=4, rock_ridge="1.09", vol_ident=volume_id, sys_ident="LINUX",
                     app_ident_str="KVMPOD")
        root_rec = self.iso.get_record(iso_path="/")
        self.root = _Node(EntryKind.DIR, "", root_rec, 0o755, 0, 0, 0.0)
        self.nodes: dict[str, _Node] = {}
        self.data: list[_LazyData] = []
        self.files = self.dirs = self.symlinks = self.hardlinks = self.data_bytes = 0
        self.volume_mtime = 0.0

    # -- adding entries -------------------------------------------------------------------------

    def add(self, e: RootfsEntry) -> None:
        if not isinstance(e, RootfsEntry):
            raise TypeError(f"build_iso takes RootfsEntry objects, not {type(e).__name__}")
        self._check_attrs(e)
        if e.path == ROOT_PATH:
            if e.kind is not EntryKind.DIR:
                raise ImageError("/: the rootfs root must be a directory")
            self._set_attrs(self.root, e)
            return
        _check_path(e.path)
        existing = self.nodes.get(e.path)
        if existing is not None:
            if e.kind is EntryKind.DIR and existing.kind is EntryKind.DIR:
                self._set_attrs(existing, e)  # an explicit entry for an implied directory
                return
            raise ImageError(f"/{e.path}: duplicate entry")
        dirname, _, name = e.path.rpartition("/")
        parent = self._parent(dirname, e)
        if e.kind is EntryKind.DIR:
            self._add_dir(e.path, name, parent, e)
        elif e.kind is EntryKind.FILE:
            self._add_file(e.path, name, parent, e)
        elif e.kind is EntryKind.SYMLINK:
            self._add_symlink(e.path, name, parent, e)
        elif e.kind is EntryKind.HARDLINK:
            self._add_hardlink(e.path, name, parent, e)
        else:  # pragma: no cover - EntryKind is closed
            raise DiskError(f"/{e.path}: unknown entry kind {e.kind}")

    @staticmethod
    def _check_attrs(e: RootfsEntry) -> None:
        for what, value in (("uid", e.uid), ("gid", e.gid)):
            if not 0 <= value <= MAX_ID:
                raise DiskError(f"/{e.path}: {what} {value} is out of range (0-{MAX_ID})")

    @staticmethod
    def _set_attrs(node: _Node, e: RootfsEntry) -> None:
        node.mode, node.uid, node.gid, node.mtime = e.mode & 0o7777, e.uid, e.gid, e.mtime

    def _parent(self, dirname: str, e: RootfsEntry) -> _Node:
        """The directory node `e` goes into; parents no entry declared are implied (0755 0:0, e's mtime)."""
        missing: list[str] = []
        node: _Node | None = self.root
        probe = dirname
        while probe:
            node = self.nodes.get(probe)
            if node is not None:
                break
            missing.append(probe)
            probe = probe.rpartition("/")[0]
        else:
            node = self.root
        assert node is not None
        if node.kind is EntryKind.SYMLINK:
            raise ImageError(
                f"/{e.path}: its parent /{probe} is a symlink; entries may not be written through symlinks"
            )
        if node.kind is not EntryKind.DIR:
            raise ImageError(f"/{e.path}: its parent /{probe} is not a directory")
        for path in reversed(missing):
            node = self._add_dir(path, path.rpartition("/")[2], node,
                                 RootfsEntry(path, EntryKind.DIR, 0o755, 0, 0, e.mtime))
        return node

    def _new_iso_path(self, parent: _Node, is_file: bool) -> tuple[str, str]:
        ident = f"{parent.next_name:0{_ISO_NAME_WIDTH}X}"
        parent.next_name += 1
        if is_file:
            ident += ".;1"
        return f"{parent.iso_path}/{ident}", ident

    def _added_record(self, parent: _Node, iso_path: str, ident: str) -> Any:
        # Generated names only grow, so pycdlib appended the new record at the end of its parent's
        # (sorted) children: found in O(1) instead of a path lookup from the root.
        children = parent.rec.children
        if children and children[-1].file_identifier() == ident.encode("ascii"):
            return children[-1]
        return self.iso.get_record(iso_path=iso_path)  # pragma: no cover - defensive

    def _add_dir(self, path: str, name: str, parent: _Node, e: RootfsEntry) -> _Node:
        iso_path, ident = self._new_iso_path(parent, is_file=False)
        _pycdlib_call(path, self.iso.add_directory, iso_path=iso_path, rr_name=_Name(name),
                      file_mode=_S_IFDIR | (e.mode & 0o7777))
        node = _Node(EntryKind.DIR, iso_path, self._added_record(parent, iso_path, ident),
                     e.mode & 0o7777, e.uid, e.gid, e.mtime, parent)
        self.nodes[path] = node
        self.dirs += 1
        return node

    def _add_file(self, path: str, name: str, parent: _Node, e: RootfsEntry) -> None:
        check_file_size(f"/{path}", e.size)
        if e.size < 0:
            raise DiskError(f"/{path}: negative file size {e.size}")
        if e.size and e.opener is None:
            raise DiskError(f"/{path}: file entry without data")
        data = _LazyData(path, e.size, e.opener or _no_data)
        iso_path, ident = self._new_iso_path(parent, is_file=True)
        _pycdlib_call(path, self.iso.add_fp, fp=data, length=e.size, iso_path=iso_path, rr_name=_Name(name),
                      file_mode=_S_IFREG | (e.mode & 0o7777))
        self.data.append(data)
        self.nodes[path] = _Node(EntryKind.FILE, iso_path, self._added_record(parent, iso_path, ident),
                                 e.mode & 0o7777, e.uid, e.gid, e.mtime, parent)
        self.files += 1
        self.data_bytes += e.size

    def _add_symlink(self, path: str, name: str, parent: _Node, e: RootfsEntry) -> None:
        target = e.link_target
        if not target:
            raise ImageError(f"/{path}: symlink with an empty target")
        if "\x00" in target:
            raise ImageError(f"/{path}: symlink target contains a NUL byte")
        try:
            target_len = len(encode_name(target))
        except UnicodeError as cause:
            raise ImageError(f"/{path}: symlink target is not representable as bytes") from cause
        if target_len > MAX_SYMLINK_TARGET_BYTES:
            raise DiskError(f"/{path}: symlink targets longer than {MAX_SYMLINK_TARGET_BYTES} bytes are not supported")
        iso_path, ident = self._new_iso_path(parent, is_file=True)
        _pycdlib_call(path, self.iso.add_symlink, symlink_path=iso_path, rr_symlink_name=_Name(name),
                      rr_path=_Name(target))
        self.nodes[path] = _Node(EntryKind.SYMLINK, iso_path, self._added_record(parent, iso_path, ident),
                                 e.mode & 0o7777, e.uid, e.gid, e.mtime, parent)
        self.symlinks += 1

    def _add_hardlink(self, path: str, name: str, parent: _Node, e: RootfsEntry) -> None:
        target = self.nodes.get(e.link_target)
        if target is None or target.kind is not EntryKind.FILE:
            raise ImageError(f"/{path}: hard link target /{e.link_target} is not an earlier regular file")
        iso_path, ident = self._new_iso_path(parent, is_file=True)
        _pycdlib_call(path, self.iso.add_hard_link, iso_old_path=target.iso_path, iso_new_path=iso_path,
                      rr_name=_Name(name))
        rec = self._added_record(parent, iso_path, ident)
        target.links.append(rec)
        # The link is another name for the target's inode: it has no attributes of its own.
        self.nodes[path] = _Node(EntryKind.HARDLINK, iso_path, rec, 0, 0, 0, 0.0, parent)
        self.hardlinks += 1

    # -- attributes -----------------------------------------------------------------------------

    def finish(self) -> None:
        """Give every record its Rock Ridge attributes and dates (pycdlib stamps them with the clock)."""
        self._stamp_dir(self.root, self.root.rec, self.root)
        for node in self.nodes.values():
            if node.kind is EntryKind.DIR:
                assert node.parent is not None
                self._stamp_dir(node, node.rec, node.parent)
            elif node.kind is EntryKind.FILE:
                nlinks = 1 + len(node.links)
                for rec in (node.rec, *node.links):
                    _stamp(rec, _S_IFREG | node.mode, node.uid, node.gid, node.mtime, nlinks)
            elif node.kind is EntryKind.SYMLINK:
                _stamp(node.rec, _S_IFLNK | node.mode, node.uid, node.gid, node.mtime, 1)
        # Volume dates: the newest mtime of the content, so that the same entries give the same ISO.
        mtimes = (n.mtime for n in self.nodes.values() if n.kind is not EntryKind.HARDLINK)
        self.volume_mtime = max(self.root.mtime, max(mtimes, default=self.root.mtime))
        volume_date = _vd_date(self.volume_mtime)
        for vd in (*self.iso.pvds, *self.iso.svds):
            vd.volume_creation_date = volume_date
            vd.volume_effective_date = volume_date
            vd.root_directory_record().date = _dr_date(self.root.mtime)

    @staticmethod
    def _stamp_dir(node: _Node, rec: Any, parent: _Node) -> None:
        mode = _S_IFDIR | node.mode
        # The directory's own record, then its "." and ".." records; Linux takes the root's
        # attributes from its "." record.
        if not rec.is_root:
            _stamp(rec, mode, node.uid, node.gid, node.mtime, None)
        _stamp(rec.children[0], mode, node.uid, node.gid, node.mtime, None)
        _stamp(rec.children[1], _S_IFDIR | parent.mode, parent.uid, parent.gid, parent.mtime, None)

    # -- writing --------------------------------------------------------------------------------

    def write(self, f: BinaryIO) -> None:
        try:
            self.iso.write_fp(f)
        except pycdlib.pycdlibexception.PyCdlibException as e:
            raise DiskError(f"cannot write the rootfs disk: {e}") from e
        # pycdlib stamps the volume modification date with the clock while writing: overwrite it.
        date = _vd_date(self.volume_mtime).record()
        sector = _VD_FIRST_SECTOR
        while True:
            f.seek(sector * _SECTOR)
            vd_type = f.read(1)
            if not vd_type or vd_type[0] == _VD_TYPE_TERMINATOR:
                break
            if vd_type[0] in (1, 2):  # primary, supplementary (the level-4 enhanced VD)
                f.seek(sector * _SECTOR + _VD_MODIFICATION_DATE_OFFSET)
                f.write(date)
            sector += 1

    def close(self) -> None:
        for data in self.data:
            data.close()
        try:
            self.iso.close()
        except pycdlib.pycdlibexception.PyCdlibException:  # pragma: no cover
            pass


def _no_data() -> BinaryIO:  # pragma: no cover - never called: an empty file is never read
    raise DiskError("internal error: reading an empty file")


def _check_path(path: str) -> None:
    if not path or path.startswith("/") or path.endswith("/"):
        raise ImageError(f"/{path}: not a normalised rootfs-relative path")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ImageError(f"/{path}: not a normalised rootfs-relative path")
        if "\x00" in part:
            raise ImageError(f"/{path}: NUL bytes are not allowed in names")
        try:
            size = len(encode_name(part))
        except UnicodeError as e:
            raise ImageError(f"/{path}: name is not representable as bytes") from e
        if size > MAX_NAME_BYTES:
            raise DiskError(
                f"/{path}: names longer than {MAX_NAME_BYTES} bytes are not supported by the guest's "
                f"ISO 9660 driver (this one is {size})"
            )


def _rr_record(rec: Any, name: str) -> Any:
    rr = rec.rock_ridge
    found = getattr(rr.dr_entries, name)
    if found is None and rr.ce_entries is not None:
        found = getattr(rr.ce_entries, name)
    if found is None:  # pragma: no cover - pycdlib always writes PX and TF
        raise DiskError(f"internal error: Rock Ridge record {name} missing")
    return found


def _stamp(rec: Any, mode: int, uid: int, gid: int, mtime: float, nlinks: int | None) -> None:
    """Set a record's PX (mode, owner, links unless None) and TF times and its ISO 9660 date."""
    px = _rr_record(rec, "px_record")
    px.posix_file_mode = mode
    px.posix_user_id = uid
    px.posix_group_id = gid
    if nlinks is not None:
        px.posix_file_links = nlinks
    tf = _rr_record(rec, "tf_record")
    date = _dr_date(mtime)
    # pycdlib's TF holds access, modification and attribute-change times: all become the mtime.
    tf.access_time = tf.modification_time = tf.attribute_change_time = date
    rec.date = date


def _utc(seconds: float) -> _dt.datetime:
    if not math.isfinite(seconds):  # entries refuse these; a caller's bad value must not crash the writer
        seconds = 0
    clamped = min(max(int(seconds // 1), _MIN_TIME), _MAX_TIME)
    return _EPOCH + _dt.timedelta(seconds=clamped)


def _dr_date(seconds: float) -> pycdlib.dates.DirectoryRecordDate:
    """A 7-byte ISO 9660 date in UTC (pycdlib's own constructor uses the local time zone)."""
    t = _utc(seconds)
    d = pycdlib.dates.DirectoryRecordDate()
    d.parse(struct.pack("=BBBBBBb", t.year - 1900, t.month, t.day, t.hour, t.minute, t.second, 0))
    return d


def _vd_date(seconds: float) -> pycdlib.dates.VolumeDescriptorDate:
    """A 17-byte volume descriptor date in UTC: YYYYMMDDHHMMSS, hundredths, GMT offset."""
    d = pycdlib.dates.VolumeDescriptorDate()
    d.parse(_utc(seconds).strftime("%Y%m%d%H%M%S").encode("ascii") + b"00\x00")
    return d
