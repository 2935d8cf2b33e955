"""Images into the store: compression by magic, image IDs, manifest errors, nothing half-written."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path

import pytest

from kvmpod.errors import ImageError, ManifestError
from kvmpod.image.archive import detect_compression
from kvmpod.image.build import build_aci
from kvmpod.image.manifest import build_manifest, parse_manifest
from kvmpod.store import Store

MANIFEST = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/t",
            "app": {"exec": ["/bin/true"], "user": "0", "group": "0"}}


def _tar(manifest: bytes | None = json.dumps(MANIFEST).encode(), rootfs: bool = True, twice: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for _ in range(2 if twice else 1):
            if manifest is not None:
                info = tarfile.TarInfo("manifest")
                info.size = len(manifest)
                tar.addfile(info, io.BytesIO(manifest))
        if rootfs:
            info = tarfile.TarInfo("rootfs/hello")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"hi\n"))
    return buf.getvalue()


def _nothing_half_written(store: Store) -> None:
    for d in (store.tmp, store.blobs, store.disks):
        assert not d.exists() or list(d.iterdir()) == [], list(d.iterdir())


@pytest.mark.parametrize("compress, name", [(lambda b: b, "none"), (gzip.compress, "gzip"),
                                            (bz2.compress, "bzip2"), (lzma.compress, "xz")])
def test_compression_is_detected_by_content_and_the_id_is_of_the_uncompressed_tar(tmp_path, compress, name):
    raw = _tar()
    aci = tmp_path / "image.tar.gz"  # the suffix lies on purpose
    aci.write_bytes(compress(raw))
    assert detect_compression(aci) == name
    image = Store(tmp_path / "store").import_aci(aci)
    assert image.id == "sha512-" + hashlib.sha512(raw).hexdigest()
    assert image.blob.read_bytes() == raw and image.manifest.name == "example.com/t"


def test_importing_twice_keeps_one_blob(tmp_path):
    aci = tmp_path / "a.aci"
    aci.write_bytes(gzip.compress(_tar()))
    store = Store(tmp_path / "store")
    assert store.import_aci(aci).blob == store.import_aci(aci).blob
    assert len(list(store.blobs.iterdir())) == 1 and list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("content, problem", [
    (gzip.compress(_tar())[:200], "corrupt or truncated"),
    (_tar(manifest=None), "no top-level 'manifest'"),
    (_tar(rootfs=False), "no 'rootfs/'"),
    (_tar(twice=True), "manifest: duplicate entry"),
    (_tar(manifest=b"{not json"), "invalid JSON"),
    (_tar(manifest=b"\xff\xfe"), "not valid UTF-8"),
    (b"this is not a tar archive at all" * 40, "not a valid tar archive"),
])
def test_bad_archives_are_one_line_errors_and_leave_nothing(tmp_path, content, problem):
    aci = tmp_path / "bad.aci"
    aci.write_bytes(content)
    store = Store(tmp_path / "store")
    with pytest.raises(ImageError, match=problem) as info:
        store.import_aci(aci)
    assert "\n" not in str(info.value) and str(aci) in str(info.value)
    _nothing_half_written(store)


@pytest.mark.parametrize("change, problem", [
    ({"acKind": "PodManifest"}, 'acKind: "PodManifest" is not "ImageManifest"'),
    ({"name": "Not_An_Identifier"}, 'name: "Not_An_Identifier" is not an AC Identifier'),
    ({"app": {"exec": ["bin/sh"], "user": "0", "group": "0"}}, 'app.exec[0]: "bin/sh" is not an absolute path'),
    ({"app": {"exec": ["/bin/sh"], "group": "0"}}, "app.user: required field is missing"),
    ({"app": {"exec": ["/x"], "user": "0", "group": "0", "environment": [{"name": "A", "value": 1}]}},
     "app.environment[0].value: 1 is not a string"),
    ({"app": {"exec": ["/x"], "user": "0", "group": "0", "supplementaryGIDs": [-1]}},
     "app.supplementaryGIDs[0]: -1 is not a non-negative integer"),
    ({"labels": [{"name": "os", "value": "linux"}, {"name": "os", "value": "linux"}]},
     'labels[1].name: "os" is a duplicate'),
])
def test_manifest_errors_name_the_field_and_value(change, problem):
    with pytest.raises(ManifestError) as info:
        parse_manifest(json.dumps({**MANIFEST, **change}).encode())
    assert problem in str(info.value)


def test_built_aci_round_trips_with_owners_and_a_valid_manifest(tmp_path):
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o4755)
    (root / "link").symlink_to("bin/tool")
    manifest = build_manifest("example.com/built", exec_=["/bin/tool", "-x"], environment={"A": "1"},
                              labels={"version": "2"})
    out = tmp_path / "built.aci"
    build_aci(root, manifest, out)
    image = Store(tmp_path / "store").import_aci(out)
    assert image.manifest.display_name == "example.com/built:2"
    assert image.manifest.labels == {"os": "linux", "arch": "amd64", "version": "2"}
    with tarfile.open(image.blob) as tar:
        members = {m.name: m for m in tar}
    assert members["rootfs/bin/tool"].mode == 0o4755 and members["rootfs/link"].linkname == "bin/tool"


def test_build_refuses_a_missing_rootfs_and_writes_nothing(tmp_path):
    with pytest.raises(ImageError, match="not a directory"):
        build_aci(tmp_path / "nope", build_manifest("example.com/x", exec_=["/x"]), tmp_path / "x.aci")
    assert list(tmp_path.iterdir()) == []


def test_rootfs_disk_is_built_once_and_reused(tmp_path):
    aci = tmp_path / "a.aci"
    aci.write_bytes(_tar())
    store = Store(tmp_path / "store")
    image = store.import_aci(aci)
    disk = store.rootfs_disk(image)
    first = disk.stat().st_mtime_ns
    assert store.rootfs_disk(image) == disk and disk.stat().st_mtime_ns == first
    assert Path(disk).name == f"{image.hex}.iso"


@pytest.mark.parametrize("name, kind, link, problem", [
    ("rootfs/../../etc/evil", tarfile.REGTYPE, "", ".."),
    ("/rootfs/abs", tarfile.REGTYPE, "", "absolute"),
    ("rootfs/esc", tarfile.LNKTYPE, "etc/passwd", "rootfs/esc"),
    ("rootfs/dev/sda", tarfile.BLKTYPE, "", "device"),
    ("elsewhere/file", tarfile.REGTYPE, "", "elsewhere/file"),
])
def test_hostile_entries_are_refused_at_import_and_never_stored(tmp_path, name, kind, link, problem):
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(_tar())) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
        evil = tarfile.TarInfo(name)
        evil.type, evil.linkname = kind, link
        dst.addfile(evil, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    aci = tmp_path / "evil.aci"
    aci.write_bytes(out.getvalue())
    store = Store(tmp_path / "store")
    with pytest.raises(ImageError) as info:
        store.import_aci(aci)
    assert problem in str(info.value) and str(aci) in str(info.value) and "\n" not in str(info.value)
    _nothing_half_written(store)
