"""The image store: the index, lookups by name/ID, stamps, export, rm, gc, URLs, --dir, concurrency."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kvmpod.errors import ImageError, UsageError
from kvmpod.image.limits import ImportLimits
from kvmpod.store import Store
from kvmpod.store.index import ImageRecord
from kvmpod.store.refs import FileRef, IdRef, NameRef, OciRef, UrlRef, parse_image_ref


def make_aci(path: Path, name: str = "example.com/app", labels: dict[str, str] | None = None,
             files: dict[str, bytes] | None = None, extra: dict | None = None) -> Path:
    manifest = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": name,
                "labels": [{"name": k, "value": v} for k, v in (labels or {}).items()],
                "app": {"exec": ["/bin/true"], "user": "0", "group": "0"}, **(extra or {})}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("rootfs")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for fname, content in (files or {"rootfs/hello": name.encode()}).items():
            info = tarfile.TarInfo(fname)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return path


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store", limits=ImportLimits())


# --- references ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("docker-archive:busybox.tar", OciRef("docker-archive:busybox.tar")),
    ("oci:/some/dir:latest", OciRef("oci:/some/dir:latest")),
    ("https://example.com/app.aci", UrlRef("https://example.com/app.aci")),
    ("sha512-" + "a" * 64, IdRef("a" * 64)),
    ("sha512-ABCDEF012345", IdRef("abcdef012345")),
    ("./app.aci", FileRef(Path("app.aci"))),
    ("/nonexistent/app", FileRef(Path("/nonexistent/app"))),
    ("missing.aci", FileRef(Path("missing.aci"))),
    ("example.com/app", NameRef("example.com/app")),
    ("example.com/app:1.0", NameRef("example.com/app", {"version": "1.0"})),
    ("example.com/app:1.0,arch=amd64", NameRef("example.com/app", {"version": "1.0", "arch": "amd64"})),
    ("busybox,channel=beta", NameRef("busybox", {"channel": "beta"})),
])
def test_image_references(text, expected):
    assert parse_image_ref(text) == expected


@pytest.mark.parametrize("text, message", [
    ("sha512-abc", "not an image ID"),
    ("sha512-" + "g" * 20, "not an image ID"),
    ("Example.com/App", "not an AC Identifier"),
    ("example.com/app:", "empty version"),
    ("example.com/app,novalue", "is not LABEL=VALUE"),
    ("", "empty string"),
])
def test_bad_image_references(text, message):
    with pytest.raises(UsageError, match=message):
        parse_image_ref(text)


# --- import, index, lookup ---------------------------------------------------------------------

def test_import_records_name_labels_size_source_and_signature(store, tmp_path):
    aci = make_aci(tmp_path / "app.aci", labels={"version": "1.0", "os": "linux"})
    image = store.import_aci(aci)
    [record] = store.list_records()
    assert record.id == image.id and record.name == "example.com/app"
    assert record.labels == {"version": "1.0", "os": "linux"}
    assert record.size == image.blob.stat().st_size and record.source == str(aci.resolve())
    assert record.signature == "unsigned" and record.manifest["name"] == "example.com/app"


def test_find_by_name_version_labels_and_id_prefixes(store, tmp_path):
    v1 = store.import_aci(make_aci(tmp_path / "v1.aci", labels={"version": "1", "channel": "stable"}))
    v2 = store.import_aci(make_aci(tmp_path / "v2.aci", labels={"version": "2", "channel": "beta"}))
    assert store.resolve("example.com/app").id == v2.id  # the newest import wins
    assert store.resolve("example.com/app:1").id == v1.id
    assert store.resolve("example.com/app,channel=beta").id == v2.id
    assert store.resolve("sha512-" + v1.hex[:64]).id == v1.id  # rkt's short form
    assert store.resolve("sha512-" + v1.hex[:12]).id == v1.id
    assert store.resolve(v1.id).id == v1.id
    with pytest.raises(ImageError, match=r"example.com/app,version=3: no such image in the store"):
        store.resolve("example.com/app:3")
    with pytest.raises(ImageError, match="no such image"):
        store.resolve("sha512-" + "0" * 64)


def test_an_ambiguous_id_prefix_is_refused(store, tmp_path):
    image = store.import_aci(make_aci(tmp_path / "a.aci"))
    record = store.list_records()[0]
    twin_hex = image.hex[:20] + "f" * 108
    twin = ImageRecord(**{**record.__dict__, "id": "sha512-" + twin_hex})
    (store.records / f"{twin_hex}.json").write_bytes(twin.to_json())
    with pytest.raises(ImageError, match="ambiguous image ID prefix"):
        store.resolve("sha512-" + image.hex[:20])
    assert store.resolve("sha512-" + image.hex[:21]).id == image.id


def test_an_unchanged_file_is_not_read_again_but_a_changed_one_is(store, tmp_path, monkeypatch):
    aci = make_aci(tmp_path / "app.aci")
    first = store.import_aci(aci)

    def must_not_read(*_a, **_k):
        raise AssertionError("the unchanged file was read again")

    import kvmpod.store.store as store_module
    monkeypatch.setattr(store_module, "decompress_to", must_not_read)
    assert store.import_aci(aci).id == first.id
    monkeypatch.undo()
    make_aci(aci, files={"rootfs/hello": b"changed"})
    assert store.import_aci(aci).id != first.id


def test_a_record_without_its_blob_is_not_an_image(store, tmp_path):
    image = store.import_aci(make_aci(tmp_path / "a.aci"))
    image.blob.unlink()
    with pytest.raises(ImageError, match="no such image"):
        store.get(image.id)
    assert store.import_aci(tmp_path / "a.aci").blob.is_file()  # the stamp is not trusted blindly


def test_export_writes_an_aci_that_reimports_to_the_same_id(store, tmp_path):
    image = store.import_aci(make_aci(tmp_path / "a.aci"))
    out = tmp_path / "out.aci"
    store.export(store.find_text("example.com/app"), out)
    assert Store(tmp_path / "other").import_aci(out).id == image.id
    with pytest.raises(ImageError, match="already exists"):
        store.export(store.find_text("example.com/app"), out)
    with pytest.raises(ImageError, match="output directory does not exist"):
        store.export(store.find_text("example.com/app"), tmp_path / "nowhere" / "x.aci")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- rm and gc ---------------------------------------------------------------------------------

def test_rm_is_refused_while_a_pod_uses_the_image_and_removes_everything_after(store, tmp_path):
    image = store.import_aci(make_aci(tmp_path / "a.aci"))
    disk = store.rootfs_disk(image)
    record = store.find_text(image.id)
    with store.claim([image]):
        with pytest.raises(ImageError, match="in use by a running pod"):
            store.remove(record)
        assert disk.exists() and image.blob.exists()
        assert store.gc() == []  # gc leaves it alone too
    store.remove(record)
    assert not disk.exists() and not image.blob.exists() and store.list_records() == []
    assert list(store.sources.iterdir()) == []
    assert [p.name for p in store.locks.iterdir()] == ["maintenance.lock"]   # rm's and gc's own, for good


def test_gc_removes_orphans_and_keeps_what_is_referenced_or_in_use(store, tmp_path):
    image = store.import_aci(make_aci(tmp_path / "a.aci"))
    disk = store.rootfs_disk(image)
    orphan_blob = store.blobs / ("0" * 128)
    orphan_blob.write_bytes(b"left by a crash between blob and record")
    orphan_disk = store.disks / ("1" * 128 + ".iso")
    orphan_disk.write_bytes(b"of an image removed long ago")
    busy_disk = store.disks / ("2" * 128 + ".iso")
    busy_disk.write_bytes(b"a removed image's disk that a pod still runs from")
    dead_tmp = store.tmp / "import-999999999-x.tar"
    dead_tmp.write_bytes(b"")
    live_tmp = store.tmp / f"import-{os.getpid()}-y.tar"
    live_tmp.write_bytes(b"")
    from kvmpod.store.locks import SharedLocks
    with SharedLocks() as pod:
        pod.add(store.use_file("2" * 128))
        removed = store.gc()
    assert sorted(removed) == sorted([f"blob sha512-{'0' * 128}", f"rootfs disk {orphan_disk.name}",
                                      f"temporary file {dead_tmp.name}"])
    assert disk.exists() and image.blob.exists() and busy_disk.exists() and live_tmp.exists()
    assert store.get(image.id).id == image.id


# --- dependencies ------------------------------------------------------------------------------

def _iso_files(disk: Path) -> dict[str, bytes]:
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(disk))
    files = {}
    try:
        for root, _dirs, names in iso.walk(rr_path="/"):
            for name in names:
                path = f"{root.rstrip('/')}/{name}"
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, rr_path=path)
                files[path] = buf.getvalue()
    finally:
        iso.close()
    return files


def test_dependencies_are_laid_down_first_and_the_whitelist_applies(store, tmp_path):
    store.import_aci(make_aci(tmp_path / "base.aci", name="example.com/base", labels={"version": "1"},
                              files={"rootfs/etc/base": b"base", "rootfs/etc/shared": b"from base",
                                     "rootfs/junk": b"x"}))
    base2 = store.import_aci(make_aci(tmp_path / "base2.aci", name="example.com/base", labels={"version": "2"},
                                      files={"rootfs/etc/base": b"base v2"}))
    dep = {"dependencies": [{"imageName": "example.com/base", "labels": [{"name": "version", "value": "1"}]}]}
    app = store.import_aci(make_aci(tmp_path / "app.aci", extra=dep,
                                    files={"rootfs/etc/shared": b"from app", "rootfs/app": b"app"}))
    assert _iso_files(store.rootfs_disk(app)) == {"/etc/base": b"base", "/etc/shared": b"from app",
                                                  "/junk": b"x", "/app": b"app"}
    pinned = {"dependencies": [{"imageName": "example.com/base", "imageID": "sha512-" + base2.hex[:64]}],
              "pathWhitelist": ["/etc/base", "/app"]}
    app2 = store.import_aci(make_aci(tmp_path / "app2.aci", name="example.com/app2", extra=pinned,
                                     files={"rootfs/app": b"app2"}))
    assert _iso_files(store.rootfs_disk(app2)) == {"/etc/base": b"base v2", "/app": b"app2"}


def test_missing_wrong_or_cyclic_dependencies_are_named(store, tmp_path):
    missing = {"dependencies": [{"imageName": "example.com/absent", "labels": [{"name": "version", "value": "9"}]}]}
    app = store.import_aci(make_aci(tmp_path / "a.aci", extra=missing))
    with pytest.raises(ImageError, match=r"example.com/app: dependencies\[0\] example.com/absent,version=9 is "
                                         r"not in the store: fetch it first"):
        store.rootfs_disk(app)
    other = store.import_aci(make_aci(tmp_path / "o.aci", name="example.com/other"))
    wrong = {"dependencies": [{"imageName": "example.com/base", "imageID": other.id}]}
    app = store.import_aci(make_aci(tmp_path / "b.aci", name="example.com/b", extra=wrong))
    with pytest.raises(ImageError, match="is named 'example.com/other'"):
        store.rootfs_disk(app)
    # a cycle through names: x needs y, y needs x
    store.import_aci(make_aci(tmp_path / "x.aci", name="example.com/x",
                              extra={"dependencies": [{"imageName": "example.com/y"}]}))
    y = store.import_aci(make_aci(tmp_path / "y.aci", name="example.com/y",
                                  extra={"dependencies": [{"imageName": "example.com/x"}]}))
    with pytest.raises(ImageError, match="dependency cycle"):
        store.rootfs_disk(y)
    assert list(store.disks.iterdir()) == []


# --- URLs --------------------------------------------------------------------------------------

def test_fetch_from_a_url(store, tmp_path, http_root):
    root, base = http_root
    local = store.import_aci(make_aci(root / "app.aci"))
    other = Store(tmp_path / "other", limits=ImportLimits())
    image = other.import_ref(f"{base}/app.aci")
    assert image.id == local.id and other.list_records()[0].source == f"{base}/app.aci"
    with pytest.raises(ImageError, match=r"/missing.aci: HTTP 404"):
        other.import_ref(f"{base}/missing.aci")
    small = Store(tmp_path / "small", limits=ImportLimits(max_size=100))
    with pytest.raises(ImageError, match="exceeds the 100 B image limit"):
        small.import_ref(f"{base}/app.aci")
    with pytest.raises(ImageError, match="cannot download"):
        other.import_ref("http://127.0.0.1:9/app.aci")
    for s in (other, small):
        assert list(s.tmp.iterdir()) == []


# --- the command line --------------------------------------------------------------------------

def kvmpod(*args: str, store: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KVMPOD_STORE_DIR"}
    result = subprocess.run([sys.executable, "-m", "kvmpod", "--dir", str(store), *args],
                            capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_the_image_commands(tmp_path):
    store_dir = tmp_path / "store"
    aci = make_aci(tmp_path / "app.aci", labels={"version": "1.0"})
    image_id = kvmpod("fetch", str(aci), store=store_dir).stdout.strip()
    assert image_id.startswith("sha512-") and len(image_id) == 7 + 128
    listing = kvmpod("image", "list", store=store_dir).stdout.splitlines()
    assert listing[0].split() == ["ID", "NAME", "VERSION", "SIZE", "IMPORTED", "SIGNATURE"]
    assert listing[1].split()[:3] == [image_id[:7 + 32], "example.com/app", "1.0"]
    [entry] = json.loads(kvmpod("image", "list", "--json", store=store_dir).stdout)
    assert entry["id"] == image_id and entry["labels"] == {"version": "1.0"}
    manifest = json.loads(kvmpod("image", "cat-manifest", "example.com/app:1.0", store=store_dir).stdout)
    assert manifest["name"] == "example.com/app"
    kvmpod("image", "export", image_id[:7 + 64], str(tmp_path / "out.aci"), store=store_dir)
    assert kvmpod("image", "import", str(tmp_path / "out.aci"), store=store_dir).stdout.strip() == image_id
    missing = kvmpod("image", "rm", "example.com/nope", image_id, store=store_dir, check=False)
    assert missing.returncode == 125 and missing.stdout.strip() == f"removed {image_id}"
    assert missing.stderr.strip().splitlines() == [
        "kvmpod: error: example.com/nope: no such image in the store (`kvmpod image list` shows what is there)"]
    assert kvmpod("image", "list", "--no-legend", store=store_dir).stdout == ""
    bad = kvmpod("fetch", str(tmp_path / "absent.aci"), store=store_dir, check=False)
    assert bad.returncode == 125 and bad.stderr.count("\n") == 1 and "absent.aci: no such image file" in bad.stderr


def test_concurrent_imports_and_gc_leave_a_consistent_store(tmp_path):
    store_dir = tmp_path / "store"
    acis = [make_aci(tmp_path / f"a{i % 3}.aci", name=f"example.com/app{i % 3}") for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-m", "kvmpod", "--dir", str(store_dir), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in [["fetch", str(acis[i % 3])] for i in range(6)] + [["image", "gc"]] * 2]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(rc == 0 for rc, _ in results), results
    store = Store(store_dir)
    records = store.list_records()
    assert sorted(r.name for r in records) == ["example.com/app0", "example.com/app1", "example.com/app2"]
    assert all((store.blobs / r.hex).is_file() for r in records)
    assert sorted(p.name for p in store.blobs.iterdir()) == sorted(r.hex for r in records)
    assert list(store.tmp.iterdir()) == []


def test_progress_is_drawn_on_a_terminal_and_silent_otherwise(tmp_path):
    import pty

    aci = make_aci(tmp_path / "big.aci", files={"rootfs/blob": os.urandom(24 << 20)})
    quiet = kvmpod("fetch", str(aci), store=tmp_path / "quiet")
    assert quiet.stderr == ""
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "KVMPOD_STORE_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "kvmpod", "--dir", str(tmp_path / "tty"), "fetch", str(aci)],
                            stdout=subprocess.PIPE, stderr=secondary, env={**env, "COLUMNS": "100"})
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 0 and proc.stdout.read().strip() == quiet.stdout.strip().encode()
    proc.stdout.close()
    assert b"importing big.aci" in seen


def test_store_location_root_user_and_dir_override(tmp_path, monkeypatch):
    from kvmpod import paths

    monkeypatch.delenv("KVMPOD_STORE_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(paths, "_store_override", None)
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.store_dir() == Path("/var/lib/kvmpod")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    assert paths.store_dir() == tmp_path / "home" / ".local" / "share" / "kvmpod"
    monkeypatch.setenv("KVMPOD_STORE_DIR", str(tmp_path / "env"))
    assert paths.store_dir() == tmp_path / "env"
    paths.set_store_dir(tmp_path / "flag")  # --dir wins over everything
    assert paths.store_dir() == tmp_path / "flag"


def test_a_disk_built_from_the_import_s_checked_entries_is_the_same_disk(tmp_path):
    """rootfs_disk right after import_aci reuses the import's header pass (kvmpod/image/aci.py
    CheckedRootfs); the disk must be byte-identical to one built from the stored blob by a new Store."""
    aci = make_aci(tmp_path / "app.aci")
    first = Store(tmp_path / "a")
    image = first.import_aci(aci)
    assert first._checked is not None and first._checked[0] == image.id
    kept_disk = first.rootfs_disk(image)
    assert first._checked is None
    other = Store(tmp_path / "b")
    other.import_aci(aci)
    other._take_checked(image.id).close()  # forget the entries: build from the blob
    assert kept_disk.read_bytes() == other.rootfs_disk(other.get(image.id)).read_bytes()
