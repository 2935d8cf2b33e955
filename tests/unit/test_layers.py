"""merge_layers (appc dependencies, OCI layers with whiteouts) and write_aci, without VMs.

Layers are built from RootfsEntry objects directly, or from real tars through entries_from_tar
where the tar reading matters (implied directories, hard links across layers). Results are checked
for the order build_iso needs, and the ISO built from them is read back with pycdlib.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pycdlib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpod.disk.entries import ROOT_PATH, EntryKind, RootfsEntry, entries_from_tar
from kvmpod.disk.iso import build_iso
from kvmpod.errors import ImageError, ManifestError
from kvmpod.image.layers import Layer, merge_layers, write_aci

T = 1_600_000_000


def f(path: str, data: bytes = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: float = T) -> RootfsEntry:
    return RootfsEntry(path, EntryKind.FILE, mode, uid, gid, mtime, size=len(data), opener=lambda: io.BytesIO(data))


def d(path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: float = T) -> RootfsEntry:
    return RootfsEntry(path, EntryKind.DIR, mode, uid, gid, mtime)


def s(path: str, target: str) -> RootfsEntry:
    return RootfsEntry(path, EntryKind.SYMLINK, 0o777, 0, 0, T, link_target=target)


def h(path: str, target: str) -> RootfsEntry:
    return RootfsEntry(path, EntryKind.HARDLINK, 0o644, 0, 0, T, link_target=target)


def by_path(entries: list[RootfsEntry]) -> dict[str, RootfsEntry]:
    return {e.path: e for e in entries}


def content(entries: list[RootfsEntry], path: str) -> bytes:
    """The data a path holds: a HARDLINK reads its FILE's."""
    found = by_path(entries)
    e = found[path]
    if e.kind is EntryKind.HARDLINK:
        e = found[e.link_target]
    assert e.kind is EntryKind.FILE
    if e.size == 0:
        return b""
    assert e.opener is not None
    with e.opener() as fp:
        return fp.read()


def check_order(entries: list[RootfsEntry]) -> None:
    """What build_iso and write_aci rely on: each path once, parents first, a link after its FILE."""
    seen: dict[str, EntryKind] = {}
    for e in entries:
        assert e.path not in seen, f"{e.path} twice"
        if e.path != ROOT_PATH:
            parent = e.path.rpartition("/")[0]
            assert not parent or seen.get(parent) is EntryKind.DIR, f"{e.path} before its parent"
        if e.kind is EntryKind.HARDLINK:
            assert seen.get(e.link_target) is EntryKind.FILE, f"{e.path} before {e.link_target}"
        seen[e.path] = e.kind


def layer_tar(tmp_path: Path, name: str, members: list[tuple]) -> tarfile.TarFile:
    """A layer tar on disk, opened for reading; members are (name, type, data or link target[, mode])."""
    path = tmp_path / name
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for arc, kind, extra, *mode in members:
            ti = tarfile.TarInfo(arc)
            ti.type, ti.mtime = kind, T
            ti.mode = mode[0] if mode else (0o755 if kind == tarfile.DIRTYPE else 0o644)
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = extra
            elif kind == tarfile.REGTYPE:
                ti.size = len(extra)
            tar.addfile(ti, io.BytesIO(extra) if kind == tarfile.REGTYPE else None)
    return tarfile.open(path, "r:")


def oci_layer(tar: tarfile.TarFile) -> list[RootfsEntry]:
    return list(entries_from_tar(tar, prefix="", implied_dirs=False, lower_links=True))


# --------------------------------------------------------------------------------------------------
# Replacing


def test_later_file_replaces_earlier_and_keeps_its_place():
    out = merge_layers([[d("etc"), f("etc/a", b"old", mode=0o600), f("etc/b")], [f("etc/a", b"new", uid=7)]])
    check_order(out)
    assert [e.path for e in out] == ["etc", "etc/a", "etc/b"]
    assert content(out, "etc/a") == b"new"
    assert by_path(out)["etc/a"].uid == 7 and by_path(out)["etc/a"].mode == 0o644


def test_directory_over_directory_keeps_children_and_takes_attributes():
    out = merge_layers([[d("srv", mode=0o700), f("srv/x", b"x")], [d("srv", mode=0o750, uid=5), f("srv/y")]])
    check_order(out)
    assert by_path(out)["srv"].mode == 0o750 and by_path(out)["srv"].uid == 5
    assert {"srv/x", "srv/y"} <= by_path(out).keys()


def test_file_over_directory_removes_the_subtree():
    out = merge_layers([[d("a"), d("a/b"), f("a/b/c", b"c"), f("keep")], [f("a", b"now a file")]])
    check_order(out)
    assert set(by_path(out)) == {"a", "keep"}
    assert content(out, "a") == b"now a file"


def test_directory_over_file_starts_empty():
    out = merge_layers([[f("a", b"file")], [d("a", mode=0o711), f("a/new")]])
    check_order(out)
    assert by_path(out)["a"].kind is EntryKind.DIR and by_path(out)["a"].mode == 0o711
    assert set(by_path(out)) == {"a", "a/new"}


def test_symlink_replaces_directory_and_directory_replaces_symlink():
    out = merge_layers([[d("lib"), f("lib/x")], [s("lib", "usr/lib")]])
    assert set(by_path(out)) == {"lib"} and by_path(out)["lib"].kind is EntryKind.SYMLINK
    out = merge_layers([[s("lib", "usr/lib")], [d("lib"), f("lib/x")]])
    assert by_path(out)["lib"].kind is EntryKind.DIR and "lib/x" in by_path(out)


def test_missing_parents_are_implied():
    out = merge_layers([[f("a/b/c", b"c", mtime=T + 5)]])
    check_order(out)
    assert [(e.path, e.kind, e.mode, e.uid, e.mtime) for e in out[:2]] == [
        ("a", EntryKind.DIR, 0o755, 0, T + 5), ("a/b", EntryKind.DIR, 0o755, 0, T + 5)]


def test_root_entry_of_the_last_layer_wins_and_comes_first():
    out = merge_layers([[d(ROOT_PATH, mode=0o700), f("x")], [d(ROOT_PATH, mode=0o751, uid=3)]])
    assert out[0].path == ROOT_PATH and out[0].mode == 0o751 and out[0].uid == 3


def test_no_root_entry_when_no_layer_gives_one():
    assert all(e.path != ROOT_PATH for e in merge_layers([[f("x")]]))


# --------------------------------------------------------------------------------------------------
# Refused


def test_writing_through_a_lower_symlink_is_refused_naming_layer_and_path():
    with pytest.raises(ImageError) as exc:
        merge_layers([Layer("base.aci", [d("usr"), d("usr/lib"), s("lib", "usr/lib")]),
                      Layer("app.aci", [f("lib/evil.so")])])
    assert str(exc.value) == ("app.aci: /lib/evil.so: its parent /lib is a symlink; "
                              "entries may not be written through symlinks")


def test_writing_through_an_absolute_symlink_deep_down_is_refused():
    with pytest.raises(ImageError, match=r"layer 2: /a/etc/x/y: its parent /a/etc is a symlink"):
        merge_layers([[d("a"), s("a/etc", "/etc")], [f("a/etc/x/y")]])


def test_entry_under_a_lower_file_is_refused():
    with pytest.raises(ImageError, match=r"^layer 2: /f/x: its parent /f is not a directory$"):
        merge_layers([[f("f")], [f("f/x")]])


def test_errors_of_the_entry_stream_get_the_layer_name(tmp_path):
    tar = layer_tar(tmp_path, "dup.tar", [("a", tarfile.REGTYPE, b""), ("a", tarfile.REGTYPE, b"")])
    with pytest.raises(ImageError, match=r"^img\.tar: blobs/sha256/ab: a: duplicate entry$"):
        merge_layers([Layer("img.tar: blobs/sha256/ab", entries_from_tar(tar, prefix=""))])


def test_hard_link_to_a_path_no_layer_has_is_refused(tmp_path):
    tar = layer_tar(tmp_path, "l.tar", [("bin/sh", tarfile.LNKTYPE, "bin/busybox")])
    with pytest.raises(ImageError, match=r"^top: /bin/sh: hard link target /bin/busybox is not a regular file"):
        merge_layers([Layer("top", oci_layer(tar))])


def test_hard_link_to_a_lower_symlink_is_refused(tmp_path):
    tar = layer_tar(tmp_path, "l.tar", [("b", tarfile.LNKTYPE, "a")])
    with pytest.raises(ImageError, match="hard link target /a is not a regular file"):
        merge_layers([[s("a", "x")], oci_layer(tar)])


def test_entries_from_tar_still_refuses_foreign_hard_links_by_default(tmp_path):
    tar = layer_tar(tmp_path, "l.tar", [("b", tarfile.LNKTYPE, "a")])
    with pytest.raises(ImageError, match="not an earlier regular file of the image"):
        list(entries_from_tar(tar, prefix=""))


# --------------------------------------------------------------------------------------------------
# Whiteouts


def test_whiteout_removes_a_lower_file_and_never_appears():
    out = merge_layers([[d("etc"), f("etc/passwd"), f("etc/shadow")], [f("etc/.wh.shadow")]], whiteouts=True)
    check_order(out)
    assert set(by_path(out)) == {"etc", "etc/passwd"}


def test_whiteout_removes_a_lower_directory_with_its_subtree():
    lower = [d("var"), d("var/cache"), d("var/cache/apt"), f("var/cache/apt/pkg"), f("var/log")]
    out = merge_layers([lower, [f("var/.wh.cache")]], whiteouts=True)
    assert set(by_path(out)) == {"var", "var/log"}


def test_whiteout_then_recreate_in_the_same_layer_keeps_the_new_one():
    out = merge_layers([[d("d"), f("d/old")], [f(".wh.d"), d("d", mode=0o700), f("d/new", b"n")]], whiteouts=True)
    assert set(by_path(out)) == {"d", "d/new"} and by_path(out)["d"].mode == 0o700


def test_whiteout_after_the_entry_it_names_only_hides_lower_layers():
    # Whiteouts apply to lower layers only (image-spec layer.md), wherever they sit in the tar.
    out = merge_layers([[f("a", b"lower")], [f("a", b"upper"), f(".wh.a")]], whiteouts=True)
    assert content(out, "a") == b"upper"


def test_opaque_whiteout_empties_the_lower_directory_but_keeps_this_layers_entries():
    lower = [d("app", mode=0o700), f("app/old1"), d("app/sub"), f("app/sub/old2"), f("other")]
    upper = [f("app/new1"), f("app/.wh..wh..opq"), f("app/new2")]
    out = merge_layers([lower, upper], whiteouts=True)
    check_order(out)
    assert set(by_path(out)) == {"app", "app/new1", "app/new2", "other"}
    assert by_path(out)["app"].mode == 0o700  # the directory itself stays


def test_opaque_whiteout_at_the_root():
    out = merge_layers([[f("a"), d("b")], [f(".wh..wh..opq"), f("c")]], whiteouts=True)
    assert set(by_path(out)) == {"c"}


def test_whiteouts_of_missing_paths_are_fine():
    out = merge_layers([[f("a")], [f(".wh.nothing"), f("no/such/.wh.dir"), f("nodir/.wh..wh..opq")]],
                       whiteouts=True)
    assert set(by_path(out)) == {"a"}  # a whiteout adds nothing, not even its directory


def test_whiteout_through_a_lower_symlink_removes_nothing():
    # The lower layers hold nothing at link/passwd: the symlink is not followed.
    lower = [d("etc"), f("etc/passwd"), s("link", "/etc"), s("rel", "etc")]
    out = merge_layers([lower, [f("link/.wh.passwd"), f("rel/.wh..wh..opq")]], whiteouts=True)
    assert set(by_path(out)) == {"etc", "etc/passwd", "link", "rel"}


def test_aufs_metadata_is_ignored_and_whiteout_files_are_plain_without_whiteouts():
    out = merge_layers([[f("a"), f("b")], [f(".wh..wh.plnk"), f(".wh.b")]], whiteouts=True)
    assert set(by_path(out)) == {"a"}
    out = merge_layers([[f("a")], [f(".wh.a")]])
    assert set(by_path(out)) == {"a", ".wh.a"}


def test_entries_inside_a_whiteout_are_refused():
    with pytest.raises(ImageError, match=r"^layer 2: /.wh.d/x: entries inside a whiteout are not allowed$"):
        merge_layers([[f("a")], [f(".wh.d/x")]], whiteouts=True)


# --------------------------------------------------------------------------------------------------
# Hard links


def test_hard_link_across_layers(tmp_path):
    base = layer_tar(tmp_path, "1.tar", [("bin", tarfile.DIRTYPE, None), ("bin/busybox", tarfile.REGTYPE, b"BB", 0o755)])
    top = layer_tar(tmp_path, "2.tar", [("bin/sh", tarfile.LNKTYPE, "bin/busybox"),
                                        ("bin/ash", tarfile.LNKTYPE, "bin/sh")])
    out = merge_layers([oci_layer(base), oci_layer(top)])
    check_order(out)
    found = by_path(out)
    assert found["bin/busybox"].kind is EntryKind.FILE
    assert (found["bin/sh"].kind, found["bin/sh"].link_target) == (EntryKind.HARDLINK, "bin/busybox")
    assert (found["bin/ash"].kind, found["bin/ash"].link_target) == (EntryKind.HARDLINK, "bin/busybox")


def test_links_keep_the_old_data_when_a_later_layer_replaces_the_target(tmp_path):
    base = layer_tar(tmp_path, "1.tar", [("a", tarfile.REGTYPE, b"old", 0o750)])
    mid = layer_tar(tmp_path, "2.tar", [("b", tarfile.LNKTYPE, "a")])
    top = layer_tar(tmp_path, "3.tar", [("a", tarfile.REGTYPE, b"new")])
    out = merge_layers([oci_layer(base), oci_layer(mid), oci_layer(top)])
    check_order(out)
    assert content(out, "a") == b"new" and content(out, "b") == b"old"
    assert by_path(out)["b"].kind is EntryKind.FILE and by_path(out)["b"].mode == 0o750  # the inode's mode


def test_links_keep_the_old_data_when_the_target_is_whited_out():
    out = merge_layers([[d("x"), f("x/data", b"D"), h("y1", "x/data"), h("y2", "x/data")], [f("x/.wh.data")]],
                       whiteouts=True)
    check_order(out)
    found = by_path(out)
    assert "x/data" not in found
    assert found["y1"].kind is EntryKind.FILE and content(out, "y1") == b"D"  # the first remaining name
    assert (found["y2"].kind, found["y2"].link_target) == (EntryKind.HARDLINK, "y1")


def test_links_keep_the_old_data_when_the_target_directory_is_removed():
    out = merge_layers([[d("x"), f("x/data", b"D"), h("y", "x/data")], [f("x", b"file")]])
    assert content(out, "y") == b"D" and by_path(out)["y"].kind is EntryKind.FILE


def test_link_to_a_lower_file_that_this_layer_then_replaces(tmp_path):
    # b links the lower a; the layer then replaces a; c links b: c must share b's (old) inode.
    base = layer_tar(tmp_path, "1.tar", [("a", tarfile.REGTYPE, b"old")])
    top = layer_tar(tmp_path, "2.tar", [("b", tarfile.LNKTYPE, "a"), ("a", tarfile.REGTYPE, b"new"),
                                        ("c", tarfile.LNKTYPE, "b")])
    out = merge_layers([oci_layer(base), oci_layer(top)])
    assert (content(out, "a"), content(out, "b"), content(out, "c")) == (b"new", b"old", b"old")


def test_a_link_that_sorts_first_becomes_the_file():
    out = merge_layers([[d("z"), f("z/file", b"Z")], [d("a"), h("a/link", "z/file")]])
    check_order(out)
    assert [e.path for e in out] == ["z", "z/file", "a", "a/link"]
    out = merge_layers([[d("a"), d("z"), f("z/file", b"Z")], [h("a/link", "z/file")]])
    check_order(out)
    assert by_path(out)["a/link"].kind is EntryKind.FILE and by_path(out)["z/file"].kind is EntryKind.HARDLINK


# --------------------------------------------------------------------------------------------------
# pathWhitelist


def test_path_whitelist_keeps_listed_paths_and_their_directories():
    lower = [d("etc", mode=0o711), f("etc/ca.crt", b"ca"), f("etc/other"), d("usr"), d("usr/bin"),
             f("usr/bin/app", b"app"), f("usr/bin/tool"), d("empty")]
    upper = [d("etc", mode=0o700), f("etc/app.conf", b"conf")]
    out = merge_layers([lower, upper], path_whitelist=["/etc/ca.crt", "/usr/bin/app", "/etc/app.conf"])
    check_order(out)
    assert set(by_path(out)) == {"etc", "etc/ca.crt", "etc/app.conf", "usr", "usr/bin", "usr/bin/app"}
    assert by_path(out)["etc"].mode == 0o700  # a holding directory keeps its merged attributes


def test_a_listed_directory_keeps_itself_not_its_contents():
    layer = [d("etc"), d("etc/systemd"), d("etc/systemd/system", mode=0o700), f("etc/systemd/system/x.service")]
    out = merge_layers([layer], path_whitelist=["/etc/systemd/system/"])
    assert set(by_path(out)) == {"etc", "etc/systemd", "etc/systemd/system"}
    assert by_path(out)["etc/systemd/system"].mode == 0o700


def test_path_whitelist_keeps_a_link_whose_file_is_not_listed():
    out = merge_layers([[f("data", b"D"), h("keep", "data")]], path_whitelist=["/keep", "/missing"])
    assert set(by_path(out)) == {"keep"} and content(out, "keep") == b"D"


def test_empty_path_whitelist_keeps_everything():
    assert len(merge_layers([[f("a"), f("b")]], path_whitelist=[])) == 2


@pytest.mark.parametrize("bad", ["etc/passwd", "/etc/../shadow", ""])
def test_path_whitelist_entries_must_be_absolute_plain_paths(bad):
    with pytest.raises(ImageError, match=r"^pathWhitelist: "):
        merge_layers([[f("a")]], path_whitelist=[bad])


# --------------------------------------------------------------------------------------------------
# The result on a disk and in an ACI


def iso_tree(path: Path) -> dict[str, tuple[str, bytes]]:
    """Rock Ridge path -> (kind, data or symlink target) of an ISO, read back with pycdlib."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    tree: dict[str, tuple[str, bytes]] = {}
    try:
        for dirpath, dirs, files in iso.walk(rr_path="/"):
            for name in dirs:
                tree[f"{dirpath.rstrip('/')}/{name}"] = ("dir", b"")
            for name in files:
                full = f"{dirpath.rstrip('/')}/{name}"
                rec = iso.get_record(rr_path=full)
                if rec.rock_ridge.is_symlink():
                    tree[full] = ("symlink", rec.rock_ridge.symlink_path())
                else:
                    buf = io.BytesIO()
                    iso.get_file_from_iso_fp(buf, rr_path=full)
                    tree[full] = ("file", buf.getvalue())
    finally:
        iso.close()
    return tree


def test_merged_layers_make_a_disk(tmp_path):
    base = layer_tar(tmp_path, "1.tar", [("bin", tarfile.DIRTYPE, None), ("bin/busybox", tarfile.REGTYPE, b"BB", 0o755),
                                         ("etc", tarfile.DIRTYPE, None), ("etc/old", tarfile.REGTYPE, b"old"),
                                         ("etc/hostname", tarfile.REGTYPE, b"base")])
    top = layer_tar(tmp_path, "2.tar", [("bin/sh", tarfile.LNKTYPE, "bin/busybox"), ("etc/.wh.old", tarfile.REGTYPE, b""),
                                        ("etc/hostname", tarfile.REGTYPE, b"top"), ("lib", tarfile.SYMTYPE, "usr/lib")])
    out = merge_layers([Layer("1", oci_layer(base)), Layer("2", oci_layer(top))], whiteouts=True)
    build_iso(out, tmp_path / "rootfs.iso")
    assert iso_tree(tmp_path / "rootfs.iso") == {
        "/bin": ("dir", b""), "/bin/busybox": ("file", b"BB"), "/bin/sh": ("file", b"BB"),
        "/etc": ("dir", b""), "/etc/hostname": ("file", b"top"), "/lib": ("symlink", b"usr/lib")}


def test_implied_directories_of_an_upper_layer_keep_the_lower_attributes(tmp_path):
    base = layer_tar(tmp_path, "1.tar", [("opt", tarfile.DIRTYPE, None, 0o700), ("opt/a", tarfile.REGTYPE, b"a")])
    top = layer_tar(tmp_path, "2.tar", [("opt/b", tarfile.REGTYPE, b"b")])  # no entry for opt/
    out = merge_layers([oci_layer(base), oci_layer(top)])
    assert by_path(out)["opt"].mode == 0o700


def aci_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


MANIFEST = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/merged"}


def test_write_aci_is_deterministic_and_keeps_attributes(tmp_path):
    long_name = "/".join(["d" * 60] * 3) + "/file"
    entries = merge_layers([[d(ROOT_PATH, mode=0o751, mtime=T + 1), f(long_name, b"L", uid=3_000_000, gid=70_000,
                                                                     mtime=T + 0.5, mode=0o4755),
                             s("link", "/" + long_name), h("hard", long_name)]])
    first, second = io.BytesIO(), io.BytesIO()
    write_aci(entries, MANIFEST, first)
    write_aci(entries, MANIFEST, second)
    assert first.getvalue() == second.getvalue()
    members = aci_members(first.getvalue())
    assert [m.name for m in members][:2] == ["manifest", "rootfs"]
    manifest, root = members[0], members[1]
    assert (manifest.mtime, manifest.uid, manifest.uname, manifest.mode) == (0, 0, "", 0o644)
    assert (root.mode, root.mtime) == (0o751, T + 1)
    found = {m.name: m for m in members}
    file = found["rootfs/" + long_name]
    assert (file.uid, file.gid, file.mode, file.mtime, file.uname, file.gname) == (3_000_000, 70_000, 0o4755, T + 0.5, "", "")
    assert found["rootfs/link"].linkname == "/" + long_name
    assert found["rootfs/hard"].islnk() and found["rootfs/hard"].linkname == "rootfs/" + long_name
    with tarfile.open(fileobj=io.BytesIO(first.getvalue()), mode="r:") as tar:
        assert json.loads(tar.extractfile("manifest").read()) == MANIFEST  # type: ignore[union-attr]


def test_write_aci_output_is_an_aci_the_disk_builder_takes(tmp_path):
    entries = merge_layers([[d("etc"), f("etc/a", b"A")], [h("b", "etc/a"), f("etc/a", b"new")]])
    path = tmp_path / "x.aci"
    with path.open("wb") as out:
        write_aci(entries, MANIFEST, out)
    with tarfile.open(path, "r:") as tar:
        build_iso(entries_from_tar(tar), tmp_path / "x.iso")
    assert iso_tree(tmp_path / "x.iso") == {"/etc": ("dir", b""), "/etc/a": ("file", b"new"), "/b": ("file", b"A")}


def test_write_aci_keeps_names_that_are_not_utf8():
    name = b"caf\xe9-\xff".decode("utf-8", "surrogateescape")
    out = io.BytesIO()
    write_aci([f(name, b"x"), s("link", name)], MANIFEST, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as tar:
        assert [(e.path, e.link_target) for e in entries_from_tar(tar)][1:] == [(name, ""), ("link", name)]


def test_write_aci_adds_a_root_when_there_is_no_root_entry():
    out = io.BytesIO()
    write_aci([f("x", b"1")], MANIFEST, out)
    members = aci_members(out.getvalue())
    assert [(m.name, m.mode, m.mtime) for m in members[1:]] == [("rootfs", 0o755, 0), ("rootfs/x", 0o644, T)]


def test_write_aci_refuses_an_invalid_manifest_before_writing():
    out = io.BytesIO()
    with pytest.raises(ManifestError):
        write_aci([f("x")], {**MANIFEST, "name": "Not An Identifier"}, out)
    assert out.getvalue() == b""


def test_write_aci_refuses_file_data_that_ends_early():
    short = RootfsEntry("x", EntryKind.FILE, 0o644, 0, 0, T, size=10, opener=lambda: io.BytesIO(b"abc"))
    with pytest.raises(ImageError, match=r"^/x: file data ended 7 bytes early$"):
        write_aci([short], MANIFEST, io.BytesIO())


@pytest.mark.parametrize("path", ["../etc/passwd", "a/../b", "/abs"])
def test_write_aci_refuses_paths_that_would_escape(path):
    with pytest.raises(ImageError, match="not a normalised rootfs-relative path"):
        write_aci([f(path)], MANIFEST, io.BytesIO())


# --------------------------------------------------------------------------------------------------
# Any layers: the result is always in an order the disk builder takes


_NAMES = st.sampled_from(["a", "b", "c", ".wh.a", ".wh.b", ".wh..wh..opq"])
_PATHS = st.lists(_NAMES, min_size=1, max_size=3).map("/".join)


@st.composite
def _entry(draw, earlier: list[str]) -> RootfsEntry:
    path = draw(_PATHS)
    kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink"]))
    if kind == "dir":
        return d(path)
    if kind == "symlink":
        return s(path, draw(st.sampled_from(["a", "/b", "../c"])))
    if kind == "hardlink" and earlier:
        return h(path, draw(st.sampled_from(earlier)))
    return f(path, path.encode())


@st.composite
def _layers(draw) -> list[list[RootfsEntry]]:
    layers = []
    paths: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        layer = [draw(_entry(paths)) for _ in range(draw(st.integers(0, 6)))]
        paths += [e.path for e in layer]
        layers.append(layer)
    return layers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=_layers(), whiteouts=st.booleans())
def test_any_merge_result_is_in_disk_order(tmp_path, layers, whiteouts):
    try:
        out = merge_layers(layers, whiteouts=whiteouts)
    except ImageError:
        return  # a layer wrote through a symlink or under a file, or linked a non-file
    check_order(out)
    if whiteouts:
        assert not any(e.path.rpartition("/")[2].startswith(".wh.") for e in out)
    digest = hashlib.sha256(repr(out).encode()).hexdigest()
    build_iso(out, tmp_path / f"{digest}.iso")
