"""The rootfs disk builder: tar / directory tree -> ISO 9660 + Rock Ridge, read back with pycdlib.

No VM and no root needed (ownership of a real directory tree is only checked when running as root).
Every test reads the ISO back through pycdlib's parser and compares the Rock Ridge view (what Linux's
isofs shows the guest) with what the archive said.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import os
import socket
import stat
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pycdlib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpod.disk.entries import MAX_FILE_SIZE, EntryKind, RootfsEntry, entries_from_dir, entries_from_tar
from kvmpod.disk.iso import build_iso
from kvmpod.errors import DiskError, ImageError

# --------------------------------------------------------------------------------------------------
# Building tars


class Tar:
    """An in-memory tar written with explicit headers (mode, owner, mtime, type, link name)."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(  # noqa: SIM115 - closed by save()
            fileobj=self.buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape")
        self.members: list[tarfile.TarInfo] = []
        self.data: dict[str, bytes] = {}

    def add(self, name: str, type: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644,
            uid: int = 0, gid: int = 0, mtime: float = 1_600_000_000, linkname: str = "",
            size: int | None = None) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime, ti.linkname = type, mode, uid, gid, mtime, linkname
        ti.uname = ti.gname = ""
        ti.size = len(data) if size is None else size
        self.tar.addfile(ti, io.BytesIO(data) if data else None)
        self.members.append(ti)
        self.data[name] = data
        return ti

    def file(self, name: str, data: bytes = b"", **kw) -> tarfile.TarInfo:
        return self.add(name, tarfile.REGTYPE, data, **kw)

    def dir(self, name: str, **kw) -> tarfile.TarInfo:
        kw.setdefault("mode", 0o755)
        return self.add(name, tarfile.DIRTYPE, **kw)

    def symlink(self, name: str, target: str, **kw) -> tarfile.TarInfo:
        kw.setdefault("mode", 0o777)
        return self.add(name, tarfile.SYMTYPE, linkname=target, **kw)

    def hardlink(self, name: str, target: str, **kw) -> tarfile.TarInfo:
        return self.add(name, tarfile.LNKTYPE, linkname=target, **kw)

    def save(self, path: Path) -> Path:
        self.tar.close()
        path.write_bytes(self.buf.getvalue())
        return path


def build_from_tar(tmp_path: Path, t: Tar, prefix: str = "rootfs/", name: str = "rootfs.iso"):
    """Save the tar, build the ISO from it (seekable file, as the caller does); return (iso, stats)."""
    src = t.save(tmp_path / "image.tar")
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / name
    with src.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        stats = build_iso(entries_from_tar(tar, prefix), out)
    return out, stats


# --------------------------------------------------------------------------------------------------
# Reading the ISO back


@dataclass
class Seen:
    kind: str  # "dir", "file", "symlink"
    mode: int  # full st_mode
    uid: int
    gid: int
    nlinks: int
    mtime: int
    target: bytes = b""
    size: int = 0
    extent: int = -1
    iso_path: str = ""


def _rr(rec, name):
    rr = rec.rock_ridge
    found = getattr(rr.dr_entries, name)
    if found is None and rr.ce_entries is not None:
        found = getattr(rr.ce_entries, name)
    assert found is not None, f"record without Rock Ridge {name}"
    return found


def _seen(rec, iso_path: str) -> Seen:
    px, tf = _rr(rec, "px_record"), _rr(rec, "tf_record")
    d = tf.modification_time
    mtime = calendar.timegm((d.years_since_1900 + 1900, d.month, d.day_of_month, d.hour, d.minute, d.second))
    mtime -= d.gmtoffset * 15 * 60
    if rec.is_dir():
        kind = "dir"
    elif rec.rock_ridge.is_symlink():
        kind = "symlink"
    else:
        kind = "file"
    return Seen(kind, px.posix_file_mode, px.posix_user_id, px.posix_group_id, px.posix_file_links, mtime,
                rec.rock_ridge.symlink_path() if kind == "symlink" else b"",
                rec.get_data_length() if kind == "file" else 0,
                rec.extent_location() if kind == "file" else -1, iso_path)


class IsoView:
    """The Rock Ridge tree of an ISO: rootfs path (bytes, b"." for the root) -> Seen."""

    def __init__(self, path: Path):
        self.iso = pycdlib.PyCdlib()
        self.iso.open(str(path))
        assert self.iso.has_rock_ridge()
        root = self.iso.get_record(iso_path="/")
        self.tree: dict[bytes, Seen] = {b".": _seen(root.children[0], "/")}
        self.order: dict[bytes, list[bytes]] = {}
        self._walk(root, b"", "")

    def _walk(self, top, rr_top: bytes, iso_top: str) -> None:
        stack = [(top, rr_top, iso_top)]  # iterative: trees may be deeper than the recursion limit
        while stack:
            rec, rr_prefix, iso_prefix = stack.pop()
            names = self.order.setdefault(rr_prefix or b".", [])
            for child in rec.children:
                if child.is_dot() or child.is_dotdot():
                    continue
                name = child.rock_ridge.name()
                names.append(name)
                rr_path = rr_prefix + b"/" + name if rr_prefix else name
                iso_path = iso_prefix + "/" + child.file_identifier().decode("ascii")
                assert rr_path not in self.tree, rr_path
                self.tree[rr_path] = _seen(child, iso_path)
                if child.is_dir():
                    stack.append((child, rr_path, iso_path))

    def __getitem__(self, path: str | bytes) -> Seen:
        key = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
        return self.tree[key]

    def data(self, path: str | bytes) -> bytes:
        out = io.BytesIO()
        self.iso.get_file_from_iso_fp(out, iso_path=self[path].iso_path)
        return out.getvalue()

    def close(self) -> None:
        self.iso.close()


def assert_matches_header(seen: Seen, ti: tarfile.TarInfo) -> None:
    assert stat.S_IMODE(seen.mode) == ti.mode & 0o7777, (ti.name, oct(seen.mode), oct(ti.mode))
    assert (seen.uid, seen.gid) == (ti.uid, ti.gid), ti.name
    assert seen.mtime == int(ti.mtime // 1), ti.name


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------------
# Round trips


def test_tar_round_trip_preserves_names_modes_owners_times_links(tmp_path):
    t = Tar()
    t.file("manifest", b'{"acKind": "ImageManifest"}')
    root = t.dir("rootfs", mode=0o750, uid=1000, gid=1000, mtime=1_500_000_000)
    t.dir("rootfs/bin", mode=0o755, mtime=1_500_000_100)
    t.file("rootfs/bin/su", b"#!/bin/su\n", mode=0o4755, uid=0, gid=0, mtime=1_500_000_200)
    t.file("rootfs/bin/wall", b"wall", mode=0o2755, uid=0, gid=5, mtime=1_500_000_201)
    t.dir("rootfs/tmp", mode=0o1777, mtime=1_500_000_300)
    t.dir("rootfs/home/user", mode=0o2750, uid=1000, gid=1000, mtime=1_500_000_400)  # parent implied
    t.file("rootfs/home/user/.profile", b"export X=1\n", mode=0o600, uid=1000, gid=1000, mtime=1_234_567_890.75)
    t.file("rootfs/home/user/empty", b"", mode=0o640, uid=65534, gid=65534, mtime=0)
    t.symlink("rootfs/bin/sh", "busybox", uid=1000, gid=1000, mtime=1_500_000_500)
    t.symlink("rootfs/etc/mtab", "/proc/self/mounts", mtime=1_500_000_501)  # absolute, parent implied
    t.symlink("rootfs/dangling", "../../nowhere/at all", mtime=1_500_000_502)
    t.hardlink("rootfs/bin/su2", "rootfs/bin/su")
    t.file("rootfs/caf\udce9", b"latin-1 name", mtime=1_500_000_600)  # not UTF-8: byte 0xE9
    t.dir("rootfs/d\udcff", mode=0o700, mtime=1_500_000_610)  # non-UTF-8 directory, symlink, link names
    t.symlink("rootfs/d\udcff/s\udcfe", "caf\udce9", mtime=1_500_000_611)
    t.hardlink("rootfs/d\udcff/h\udcfd", "rootfs/caf\udce9")
    t.file("rootfs/\u65e5\u672c\u8a9e \u2603", b"utf-8 name", mtime=1_500_000_601)
    long_name = "L" * 253
    t.file(f"rootfs/{long_name}", b"long name", mtime=1_500_000_602)
    out, stats = build_from_tar(tmp_path, t)

    v = IsoView(out)
    assert_matches_header(v["."], root)
    assert stat.S_ISDIR(v["."].mode)
    for ti in t.members:
        if ti.name in ("manifest", "rootfs") or ti.islnk():
            continue
        path = ti.name.removeprefix("rootfs/")
        seen = v[path]
        assert_matches_header(seen, ti)
        if ti.isdir():
            assert seen.kind == "dir" and stat.S_ISDIR(seen.mode)
        elif ti.issym():
            assert seen.kind == "symlink" and stat.S_ISLNK(seen.mode)
            assert seen.target == ti.linkname.encode("utf-8", "surrogateescape")
        else:
            assert seen.kind == "file" and stat.S_ISREG(seen.mode)
            assert seen.size == ti.size
            assert v.data(path) == t.data[ti.name]

    # The hard link is the same inode: same data extent, the target's attributes, link count 2.
    su, su2 = v["bin/su"], v["bin/su2"]
    assert su2.extent == su.extent and su2.size == su.size
    assert (su2.mode, su2.uid, su2.gid, su2.mtime) == (su.mode, su.uid, su.gid, su.mtime)
    assert su.nlinks == su2.nlinks == 2
    assert v.data("bin/su2") == b"#!/bin/su\n"

    # Implied parents: 0755 0:0, the mtime of the member that needed them.
    assert (stat.S_IMODE(v["home"].mode), v["home"].uid, v["home"].gid) == (0o755, 0, 0)
    assert v["home"].mtime == 1_500_000_400
    assert v["etc"].mtime == 1_500_000_501

    # Names: raw non-UTF-8 bytes and long names come back verbatim.
    assert b"caf\xe9" in v.tree
    assert v[b"d\xff/s\xfe"].target == b"caf\xe9"
    assert v[b"d\xff/h\xfd"].extent == v[b"caf\xe9"].extent
    assert long_name.encode() in v.tree

    # Directory link counts: 2 + subdirectories (what find(1) relies on).
    assert v["."].nlinks == 2 + 5  # bin, tmp, home, etc, d\xff
    assert v["tmp"].nlinks == 2
    assert v["home"].nlinks == 3

    # Readdir order is archive order.
    assert v.order[b"bin"] == [b"su", b"wall", b"sh", b"su2"]

    assert stats.files == 7 and stats.symlinks == 4 and stats.hardlinks == 2
    assert stats.dirs == 6  # bin, tmp, home, home/user, etc, d\xff
    assert stats.data_bytes == sum(len(d) for n, d in t.data.items() if n != "manifest")
    assert stats.iso_bytes == out.stat().st_size and stats.iso_bytes % 2048 == 0
    v.close()


def test_root_defaults_to_0755_root_owned_without_a_rootfs_entry(tmp_path):
    t = Tar()
    t.file("manifest", b"{}")
    t.file("rootfs/a", b"x", uid=1000)
    out, _ = build_from_tar(tmp_path, t)
    root = IsoView(out)["."]
    assert (root.mode, root.uid, root.gid) == (stat.S_IFDIR | 0o755, 0, 0)


@pytest.mark.parametrize("root_name", ["rootfs/", "rootfs/.", "./rootfs/"])
def test_rootfs_dir_entry_sets_root_attributes(tmp_path, root_name):
    t = Tar()
    t.dir(root_name, mode=0o700, uid=1000, gid=65534, mtime=1_400_000_000)
    t.file("rootfs/a", b"x")
    out, _ = build_from_tar(tmp_path, t)
    root = IsoView(out)["."]
    assert (root.mode, root.uid, root.gid, root.mtime) == (stat.S_IFDIR | 0o700, 1000, 65534, 1_400_000_000)


def test_dot_slash_names_and_archive_root_entry_are_accepted(tmp_path):
    t = Tar()  # as written by `tar -C aci -cf image.tar .`
    t.dir("./")
    t.file("./manifest", b"{}")
    t.dir("./rootfs/", mode=0o711)
    t.file("./rootfs/./etc//hostname", b"box\n")
    out, stats = build_from_tar(tmp_path, t)
    v = IsoView(out)
    assert stat.S_IMODE(v["."].mode) == 0o711
    assert v.data("etc/hostname") == b"box\n"
    assert stats.files == 1 and stats.dirs == 1


def test_explicit_directory_after_its_contents_sets_its_attributes(tmp_path):
    t = Tar()
    t.file("rootfs/var/lib/x", b"x", mtime=1_000)
    t.dir("rootfs/var", mode=0o700, uid=7, gid=8, mtime=2_000)
    out, stats = build_from_tar(tmp_path, t)
    var = IsoView(out)["var"]
    assert (var.mode, var.uid, var.gid, var.mtime) == (stat.S_IFDIR | 0o700, 7, 8, 2_000)
    assert stats.dirs == 2


def test_empty_prefix_takes_the_whole_archive_as_rootfs(tmp_path):
    t = Tar()
    t.dir(".", mode=0o750)
    t.file("manifest", b"just a file here")
    out, _ = build_from_tar(tmp_path, t, prefix="")
    v = IsoView(out)
    assert stat.S_IMODE(v["."].mode) == 0o750
    assert v.data("manifest") == b"just a file here"


def test_deep_directory_tree(tmp_path):
    t = Tar()
    parts = [f"d{i}" for i in range(30)]
    for depth in range(1, len(parts) + 1):
        t.dir("rootfs/" + "/".join(parts[:depth]), mode=0o700 + depth % 8, mtime=1_000_000 + depth)
    deep_file = "rootfs/" + "/".join(parts) + "/leaf"
    t.file(deep_file, b"deep", mode=0o604)
    out, stats = build_from_tar(tmp_path, t)
    v = IsoView(out)
    for ti in t.members:
        assert_matches_header(v[ti.name.removeprefix("rootfs/")], ti)
    assert v.data(deep_file.removeprefix("rootfs/")) == b"deep"
    assert stats.dirs == 30
    # No Rock Ridge relocation: nothing but the tree itself at the top (no RR_MOVED directory).
    assert v.order[b"."] == [b"d0"]


def test_symlink_targets_are_kept_verbatim(tmp_path):
    targets = ["/", ".", "..", "../x", "./x", "a//b", "dir/", "//a", "/a/./b/../c", "x" * 300 + "/" + "y" * 200,
               "/" + "/".join(["component"] * 400)[:4094], "t\u00e9st", "caf\udce9"]
    t = Tar()
    for i, target in enumerate(targets):
        t.symlink(f"rootfs/s{i}", target)
    out, _ = build_from_tar(tmp_path, t)
    v = IsoView(out)
    for i, target in enumerate(targets):
        assert v[f"s{i}"].target == target.encode("utf-8", "surrogateescape"), target[:40]


def test_large_file_is_streamed_not_loaded(tmp_path):
    size = 64 << 20
    reads: list[int] = []

    period = bytes(i * 7 % 251 for i in range(251))

    class Pattern(io.RawIOBase):
        """`size` bytes of a repeating pattern, generated on the fly; records every read size."""

        def __init__(self):
            self.pos = 0

        def readable(self):
            return True

        def readinto(self, b):
            reads.append(len(b))
            n = min(len(b), size - self.pos)
            off = self.pos % len(period)
            b[:n] = (period[off:] + period * (n // len(period) + 1))[:n]
            self.pos += n
            return n

    expected = hashlib.sha256()
    p = Pattern()
    while chunk := p.read(1 << 20):
        expected.update(chunk)
    reads.clear()

    entries = [RootfsEntry("big", EntryKind.FILE, 0o644, 0, 0, 1.0, size=size, opener=Pattern)]
    out = tmp_path / "big.iso"
    stats = build_iso(entries, out)
    assert stats.data_bytes == size and out.stat().st_size >= size
    assert reads and max(reads) <= 64 << 10  # pycdlib copies in 32 KiB blocks

    v = IsoView(out)

    class Hasher:
        def __init__(self):
            self.h = hashlib.sha256()

        def write(self, data):
            self.h.update(data)
            return len(data)

    h = Hasher()
    v.iso.get_file_from_iso_fp(h, iso_path=v["big"].iso_path)
    assert v["big"].size == size
    assert h.h.hexdigest() == expected.hexdigest()


def test_hard_link_chains_and_link_counts(tmp_path):
    t = Tar()
    t.file("rootfs/a", b"shared", mode=0o755, uid=3, gid=4, mtime=5_000)
    t.hardlink("rootfs/b", "rootfs/a", mode=0o600, uid=9, gid=9, mtime=9_000)  # own header ignored
    t.hardlink("rootfs/sub/c", "rootfs/b")  # a link to a link is a link to the file
    t.file("rootfs/lonely", b"1")
    out, stats = build_from_tar(tmp_path, t)
    v = IsoView(out)
    a, b, c = v["a"], v["b"], v["sub/c"]
    assert a.extent == b.extent == c.extent
    assert a.nlinks == b.nlinks == c.nlinks == 3
    for s in (b, c):
        assert (s.mode, s.uid, s.gid, s.mtime) == (a.mode, 3, 4, 5_000)
    assert v["lonely"].nlinks == 1
    assert stats.hardlinks == 2 and stats.data_bytes == len(b"shared") + 1


def test_output_is_deterministic(tmp_path, monkeypatch):
    def tar() -> Tar:
        t = Tar()
        t.dir("rootfs", mode=0o755, mtime=1_700_000_000)
        t.file("rootfs/a/b", b"data", mtime=1_700_000_001)
        t.symlink("rootfs/l", "a/b", mtime=1_700_000_002)
        t.hardlink("rootfs/h", "rootfs/a/b")
        return t

    isos = []
    for clock, tz in ((1_000_000_000.0, "UTC"), (2_000_000_000.0, "Asia/Kolkata")):
        monkeypatch.setattr(time, "time", lambda clock=clock: clock)  # pycdlib stamps records with time.time()
        monkeypatch.setenv("TZ", tz)  # and converts with localtime()
        time.tzset()
        out, _ = build_from_tar(tmp_path, tar(), name=f"{tz.replace('/', '_')}.iso")
        isos.append(out.read_bytes())
    monkeypatch.undo()
    time.tzset()
    assert isos[0] == isos[1]


def test_mtimes_are_whole_seconds_utc_and_clamped_to_the_iso_range(tmp_path):
    entries = [
        RootfsEntry("frac", EntryKind.FILE, 0o644, 0, 0, 1_234_567_890.999),
        RootfsEntry("before1970", EntryKind.FILE, 0o644, 0, 0, -86_400.0),
        RootfsEntry("ancient", EntryKind.FILE, 0o644, 0, 0, -5_000_000_000.0),
        RootfsEntry("future", EntryKind.FILE, 0o644, 0, 0, 9e12),
    ]
    out = tmp_path / "t.iso"
    build_iso(entries, out)
    v = IsoView(out)
    assert v["frac"].mtime == 1_234_567_890
    assert v["before1970"].mtime == -86_400
    assert v["ancient"].mtime == calendar.timegm((1900, 1, 1, 0, 0, 0))
    assert v["future"].mtime == calendar.timegm((2155, 12, 31, 23, 59, 59))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.binary(min_size=1, max_size=253).filter(lambda b: b"/" not in b and b"\0" not in b
                                                                 and b not in (b".", b"..")),
                      min_size=1, max_size=8, unique=True))
def test_any_linux_file_name_round_trips(tmp_path, names):
    entries = [RootfsEntry(os.fsdecode(n), EntryKind.FILE, 0o644, 0, 0, 0.0, size=1,
                           opener=lambda n=n: io.BytesIO(n[:1])) for n in names]
    out = tmp_path / "names.iso"
    build_iso(entries, out)
    v = IsoView(out)
    assert v.order[b"."] == names
    for n in names:
        assert v.data(n) == n[:1]
    v.close()


# --------------------------------------------------------------------------------------------------
# Refusals: the right error, naming the offending path, and nothing left behind


def _expect_refusal(tmp_path, t: Tar, error: type[Exception], *needles: str) -> str:
    with pytest.raises(error) as exc:
        build_from_tar(tmp_path, t)
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert leftovers(tmp_path) == []
    return message


HOSTILE = {
    "absolute path": (lambda t: t.file("/rootfs/etc/passwd", b"x"), ImageError, "/rootfs/etc/passwd", "absolute"),
    "dotdot": (lambda t: t.file("rootfs/../../etc/passwd", b"x"), ImageError, "rootfs/../../etc/passwd", "'..'"),
    "dotdot inside rootfs": (lambda t: t.file("rootfs/a/../b", b"x"), ImageError, "rootfs/a/../b"),
    "write through symlinked dir": (
        lambda t: (t.symlink("rootfs/lib", "/etc"), t.file("rootfs/lib/shadow", b"x")),
        ImageError, "rootfs/lib/shadow", "symlink"),
    "write through symlink deeper": (
        lambda t: (t.dir("rootfs/a"), t.symlink("rootfs/a/b", "../.."), t.file("rootfs/a/b/c/d", b"x")),
        ImageError, "rootfs/a/b/c/d", "rootfs/a/b"),
    "parent is a file": (lambda t: (t.file("rootfs/f", b"x"), t.file("rootfs/f/g", b"y")),
                         ImageError, "rootfs/f/g", "not a directory"),
    "hardlink outside rootfs": (lambda t: t.hardlink("rootfs/passwd", "etc/passwd"),
                                ImageError, "rootfs/passwd", "outside"),
    "hardlink to the manifest": (lambda t: (t.file("manifest", b"{}"), t.hardlink("rootfs/m", "manifest")),
                                 ImageError, "rootfs/m", "outside"),
    "hardlink absolute": (lambda t: t.hardlink("rootfs/passwd", "/etc/passwd"), ImageError, "rootfs/passwd"),
    "hardlink dotdot": (lambda t: t.hardlink("rootfs/passwd", "rootfs/../x"), ImageError, "rootfs/passwd", "'..'"),
    "hardlink to later file": (lambda t: (t.hardlink("rootfs/a", "rootfs/b"), t.file("rootfs/b", b"x")),
                               ImageError, "rootfs/a", "not an earlier regular file"),
    "hardlink to directory": (lambda t: (t.dir("rootfs/d"), t.hardlink("rootfs/a", "rootfs/d")),
                              ImageError, "rootfs/a", "not an earlier regular file"),
    "hardlink to symlink": (lambda t: (t.symlink("rootfs/s", "x"), t.hardlink("rootfs/a", "rootfs/s")),
                            ImageError, "rootfs/a"),
    "duplicate file": (lambda t: (t.file("rootfs/a", b"1"), t.file("rootfs/a", b"2")),
                       ImageError, "rootfs/a", "duplicate"),
    "duplicate dir": (lambda t: (t.dir("rootfs/d"), t.dir("rootfs/d")), ImageError, "rootfs/d", "duplicate"),
    "file replaces dir": (lambda t: (t.dir("rootfs/d"), t.file("rootfs/d", b"x")), ImageError, "rootfs/d"),
    "duplicate root": (lambda t: (t.dir("rootfs"), t.dir("rootfs/.")), ImageError, "rootfs/.", "duplicate"),
    "root is a symlink": (lambda t: t.symlink("rootfs", "/"), ImageError, "rootfs", "must be a directory"),
    "character device": (lambda t: t.add("rootfs/dev/sda", tarfile.CHRTYPE),
                         DiskError, "rootfs/dev/sda: device nodes are not supported in the rootfs disk"),
    "block device": (lambda t: t.add("rootfs/dev/vda", tarfile.BLKTYPE),
                     DiskError, "rootfs/dev/vda: device nodes are not supported"),
    "fifo": (lambda t: t.add("rootfs/run/fifo", tarfile.FIFOTYPE),
             DiskError, "rootfs/run/fifo: FIFOs are not supported in the rootfs disk"),
    "outside rootfs": (lambda t: t.file("etc/passwd", b"x"), ImageError, "etc/passwd", "outside rootfs/"),
    "manifest not a file": (lambda t: t.symlink("manifest", "/etc/passwd"), ImageError, "manifest"),
    "empty symlink": (lambda t: t.symlink("rootfs/s", ""), ImageError, "rootfs/s", "empty"),
    "unknown type": (lambda t: t.add("rootfs/x", b"V"), ImageError, "rootfs/x", "unsupported"),
    "name too long": (lambda t: t.file("rootfs/" + "n" * 254, b"x"), DiskError, "n" * 254, "253 bytes"),
    "symlink target too long": (lambda t: t.symlink("rootfs/s", "x" * 4096), DiskError, "/s", "4095"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_or_unsupported_entries_are_refused(tmp_path, case):
    make, error, *needles = HOSTILE[case]
    t = Tar()
    if "manifest" not in case:
        t.file("manifest", b"{}")
    if "root" not in case:
        t.dir("rootfs")
    t.file("rootfs/ok-before", b"fine")  # something was already added when the refusal comes
    make(t)
    t.file("rootfs/ok-after", b"fine")
    _expect_refusal(tmp_path, t, error, *needles)


def test_huge_file_is_refused_from_its_header_alone(tmp_path):
    """A header claiming 5 GiB with no data behind it: refused before any data is read."""
    t = Tar(tarfile.GNU_FORMAT)
    t.file("manifest", b"{}")
    t.file("rootfs/small", b"x")
    t.tar.close()
    head = tarfile.TarInfo("rootfs/huge.img")
    head.size, head.mode, head.mtime = 5 << 30, 0o644, 1
    raw = t.buf.getvalue().rstrip(b"\0")  # drop the end-of-archive blocks
    raw = raw + b"\0" * (-len(raw) % 512) + head.tobuf(tarfile.GNU_FORMAT)
    src = tmp_path / "image.tar"
    src.write_bytes(raw)  # truncated archive: only the header of the huge member
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with (src.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar,
          pytest.raises(DiskError, match=r"^rootfs/huge\.img: files of 4 GiB or more are not supported")):
        build_iso(entries_from_tar(tar), out_dir / "rootfs.iso")
    assert leftovers(tmp_path) == []


def test_just_under_the_limit_passes_the_size_check():
    t = Tar(tarfile.GNU_FORMAT)
    t.tar.close()
    # entries_from_tar looks at headers only: a member of exactly MAX_FILE_SIZE bytes is accepted.
    head = tarfile.TarInfo("rootfs/ok")
    head.size = MAX_FILE_SIZE
    with tarfile.open(fileobj=io.BytesIO(head.tobuf(tarfile.GNU_FORMAT)), mode="r:") as tar:
        entries = entries_from_tar(tar)
        entry = next(entries)
        assert (entry.path, entry.size) == ("ok", MAX_FILE_SIZE)
        # (the archive is truncated after that header: reading on is an ImageError, not a tarfile error)
        with pytest.raises(ImageError, match="corrupt or truncated tar archive"):
            next(entries)
    head.size = MAX_FILE_SIZE + 1
    with (tarfile.open(fileobj=io.BytesIO(head.tobuf(tarfile.GNU_FORMAT)), mode="r:") as tar,
          pytest.raises(DiskError, match="4 GiB or more")):
        next(entries_from_tar(tar))


def test_failure_while_writing_removes_the_temp_file(tmp_path):
    (tmp_path / "out").mkdir()
    entries = [
        RootfsEntry("ok", EntryKind.FILE, 0o644, 0, 0, 0.0, size=3, opener=lambda: io.BytesIO(b"abc")),
        RootfsEntry("short", EntryKind.FILE, 0o644, 0, 0, 0.0, size=10, opener=lambda: io.BytesIO(b"12345")),
    ]
    with pytest.raises(DiskError, match=r"^/short: file data ended after 5 of 10 bytes"):
        build_iso(entries, tmp_path / "out" / "rootfs.iso")
    assert leftovers(tmp_path) == []


def test_truncated_tar_is_an_image_error(tmp_path):
    t = Tar()
    t.file("rootfs/f", b"x" * 5000)
    src = t.save(tmp_path / "image.tar")
    src.write_bytes(src.read_bytes()[:2048])  # header + part of the data
    (tmp_path / "out").mkdir()
    with (src.open("rb") as f, tarfile.open(str(src), fileobj=f, mode="r:") as tar,
          pytest.raises(ImageError, match=r"image\.tar: corrupt or truncated tar archive")):
        build_iso(entries_from_tar(tar), tmp_path / "out" / "rootfs.iso")
    assert leftovers(tmp_path) == []


def test_unreadable_file_data_is_reported_with_its_path(tmp_path):
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise tarfile.ReadError("unexpected end of data")

    (tmp_path / "out").mkdir()
    entries = [RootfsEntry("etc/f", EntryKind.FILE, 0o644, 0, 0, 0.0, size=3, opener=Broken)]
    with pytest.raises(ImageError, match=r"^/etc/f: cannot read the file data from the image: unexpected end"):
        build_iso(entries, tmp_path / "out" / "rootfs.iso")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("entry, error, needle", [
    (RootfsEntry("../x", EntryKind.DIR, 0o755, 0, 0, 0), ImageError, "/../x"),
    (RootfsEntry("/abs", EntryKind.DIR, 0o755, 0, 0, 0), ImageError, "//abs"),
    (RootfsEntry("a//b", EntryKind.DIR, 0o755, 0, 0, 0), ImageError, "/a//b"),
    (RootfsEntry("", EntryKind.DIR, 0o755, 0, 0, 0), ImageError, "normalised"),
    (RootfsEntry(".", EntryKind.FILE, 0o755, 0, 0, 0), ImageError, "root"),
    (RootfsEntry("h", EntryKind.HARDLINK, 0, 0, 0, 0, link_target="missing"), ImageError, "/h"),
    (RootfsEntry("u", EntryKind.FILE, 0o644, 2**32, 0, 0), DiskError, "/u: uid 4294967296"),
    (RootfsEntry("g", EntryKind.FILE, 0o644, 0, -1, 0), DiskError, "/g: gid -1"),
    (RootfsEntry("big", EntryKind.FILE, 0o644, 0, 0, 0, size=5 << 30), DiskError, "/big: files of 4 GiB"),
    (RootfsEntry("nodata", EntryKind.FILE, 0o644, 0, 0, 0, size=1), DiskError, "/nodata"),
])
def test_build_iso_validates_entries_itself(tmp_path, entry, error, needle):
    (tmp_path / "out").mkdir()
    with pytest.raises(error, match=None) as exc:
        build_iso([entry], tmp_path / "out" / "x.iso")
    assert needle in str(exc.value)
    assert leftovers(tmp_path) == []


def test_build_iso_refuses_writing_through_a_symlink_entry(tmp_path):
    entries = [RootfsEntry("l", EntryKind.SYMLINK, 0o777, 0, 0, 0, link_target="/etc"),
               RootfsEntry("l/x", EntryKind.FILE, 0o644, 0, 0, 0)]
    with pytest.raises(ImageError, match="symlink"):
        build_iso(entries, tmp_path / "x.iso")


def test_bad_volume_id(tmp_path):
    with pytest.raises(DiskError, match="volume ID"):
        build_iso([], tmp_path / "x.iso", volume_id="lower case")


def test_existing_output_is_replaced_atomically(tmp_path):
    out = tmp_path / "rootfs.iso"
    out.write_bytes(b"old")
    build_iso([RootfsEntry("a", EntryKind.DIR, 0o755, 0, 0, 0)], out)
    assert IsoView(out)["a"].kind == "dir"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs.iso"]


# --------------------------------------------------------------------------------------------------
# Directory trees


def _make_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "tool", 0o4755)
    os.link(root / "bin" / "tool", root / "bin" / "tool-link")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "empty").write_bytes(b"")
    os.symlink("/proc/self/mounts", root / "mtab")
    os.symlink("bin/nowhere", root / "dangling")
    (root / "home" / "user").mkdir(parents=True)
    (root / "home" / "user" / "notes").write_bytes(b"secret")
    os.chmod(root / "home" / "user" / "notes", 0o600)
    os.chmod(root / "home" / "user", 0o2750)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))  # skipped silently
    finally:
        sock.close()


def test_entries_from_dir_round_trip(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    _make_tree(root)
    as_root = os.geteuid() == 0
    if as_root:
        os.lchown(root / "home" / "user", 1000, 1000)
        os.lchown(root / "home" / "user" / "notes", 1000, 65534)
        os.lchown(root / "mtab", 65534, 65534)
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(p, (1_000_000_000 + i, 1_000_000_000 + i), follow_symlinks=False)
    os.utime(root, (1_111_111_111, 1_111_111_111))

    entries = list(entries_from_dir(root))
    assert entries[0].path == "." and entries[0].kind is EntryKind.DIR
    by_path = {e.path: e for e in entries}
    assert "sock" not in by_path
    assert by_path["bin/tool-link"].kind is EntryKind.HARDLINK
    assert by_path["bin/tool-link"].link_target == "bin/tool"

    out = tmp_path / "tree.iso"
    stats = build_iso(entries, out)
    assert (stats.files, stats.dirs, stats.symlinks, stats.hardlinks) == (3, 4, 2, 1)

    v = IsoView(out)
    for rel in [".", *(str(p.relative_to(root)) for p in root.rglob("*"))]:
        if rel == "sock":
            assert b"sock" not in v.tree
            continue
        st_ = os.lstat(root / rel)
        seen = v[rel]
        assert seen.mode == st_.st_mode, (rel, oct(seen.mode), oct(st_.st_mode))
        assert seen.mtime == int(st_.st_mtime), rel
        if as_root:
            assert (seen.uid, seen.gid) == (st_.st_uid, st_.st_gid), rel
        if stat.S_ISREG(st_.st_mode):
            assert v.data(rel) == (root / rel).read_bytes()
            assert seen.nlinks == st_.st_nlink
        if stat.S_ISLNK(st_.st_mode):
            assert seen.target == os.fsencode(os.readlink(root / rel))
    if not as_root:
        pytest.skip("ownership not checked: chown to other users needs root (modes, times, data were checked)")


def test_entries_from_dir_refuses_fifos(tmp_path):
    root = tmp_path / "tree"
    (root / "run").mkdir(parents=True)
    os.mkfifo(root / "run" / "pipe")
    with pytest.raises(DiskError, match=r"run/pipe: FIFOs are not supported in the rootfs disk"):
        list(entries_from_dir(root))


def test_entries_from_dir_refuses_device_nodes(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    try:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    with pytest.raises(DiskError, match=r"/null: device nodes are not supported in the rootfs disk"):
        list(entries_from_dir(root))


def test_entries_from_dir_refuses_huge_sparse_file(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    with open(root / "disk.img", "wb") as f:
        f.truncate(5 << 30)  # sparse: no disk space used
    (tmp_path / "out").mkdir()
    with pytest.raises(DiskError, match=r"disk\.img: files of 4 GiB or more are not supported in the rootfs disk"):
        build_iso(entries_from_dir(root), tmp_path / "out" / "x.iso")
    assert leftovers(tmp_path) == []


def test_entries_from_dir_non_utf8_names(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    raw = b"caf\xe9"
    with open(os.path.join(os.fsencode(root), raw), "wb") as f:
        f.write(b"bytes")
    out = tmp_path / "x.iso"
    build_iso(entries_from_dir(root), out)
    v = IsoView(out)
    assert v.data(raw) == b"bytes"


def test_entries_from_dir_does_not_follow_symlinked_dirs(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"no")
    root = tmp_path / "tree"
    root.mkdir()
    os.symlink(outside, root / "link")
    paths = [e.path for e in entries_from_dir(root)]
    assert paths == [".", "link"]


def test_build_iso_implies_missing_parents_and_checks_them(tmp_path):
    out = tmp_path / "x.iso"
    deep = "/".join(["p"] * 1100)  # deeper than Python's default recursion limit
    build_iso([RootfsEntry(f"{deep}/f", EntryKind.FILE, 0o600, 1, 1, 42.0),
               RootfsEntry("a/b/c", EntryKind.SYMLINK, 0o777, 0, 0, 7.0, link_target="x")], out)
    v = IsoView(out)
    assert (v["p"].mode, v["p"].uid, v["p"].mtime) == (stat.S_IFDIR | 0o755, 0, 42)
    assert v[f"{deep}/f"].uid == 1
    assert v["a/b"].mtime == 7
    with pytest.raises(ImageError, match=r"^/f/g/h: its parent /f is not a directory"):
        build_iso([RootfsEntry("f", EntryKind.FILE, 0o600, 0, 0, 0), RootfsEntry("f/g/h", EntryKind.DIR, 0o755, 0, 0, 0)],
                  tmp_path / "y.iso")


def test_disk_full_while_writing_is_a_disk_error_and_leaves_nothing(tmp_path, monkeypatch):
    import kvmpod.disk.iso as iso_mod

    real_write = iso_mod._Builder.write

    def write_then_fail(self, f):
        real_write(self, f)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(iso_mod._Builder, "write", write_then_fail)
    (tmp_path / "out").mkdir()
    with pytest.raises(DiskError, match=r"rootfs\.iso: cannot write the rootfs disk: No space left on device"):
        build_iso([RootfsEntry("a", EntryKind.DIR, 0o755, 0, 0, 0)], tmp_path / "out" / "rootfs.iso")
    assert leftovers(tmp_path) == []


def test_missing_output_directory_is_a_disk_error(tmp_path):
    with pytest.raises(DiskError, match=r"nope/x\.iso: cannot create the rootfs disk"):
        build_iso([], tmp_path / "nope" / "x.iso")


def test_empty_rootfs(tmp_path):
    out = tmp_path / "empty.iso"
    stats = build_iso([], out)
    assert (stats.files, stats.dirs, stats.symlinks, stats.hardlinks, stats.data_bytes) == (0, 0, 0, 0, 0)
    v = IsoView(out)
    assert list(v.tree) == [b"."] and v["."].mode == stat.S_IFDIR | 0o755
