"""`kvmpod image fsck` (kvmpod/store/check.py): a store damaged in each way it can be, found, one line each;
--repair fixes what loses nothing, and never what a running writer or pod holds."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpod.image.limits import ImportLimits
from kvmpod.store import Store
from kvmpod.store import locks
from kvmpod.store.check import check, repair
from tests.unit.test_store import make_aci

DEAD_PID = 999999999   # above pid_max: no such process


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store", limits=ImportLimits())


@pytest.fixture
def stored(store, tmp_path):
    """A store with one image and its rootfs disk, as a run leaves it."""
    image = store.import_aci(make_aci(tmp_path / "app.aci"))
    store.rootfs_disk(image)
    assert check(store) == []
    return image


def lines(store: Store) -> list[str]:
    return [p.line() for p in check(store)]


def fsck(store: Store, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmpod", "--dir", str(store.root), "image", "fsck", *args],
                          capture_output=True, text=True)


def test_a_clean_store_and_a_missing_one_pass(store, stored, tmp_path):
    result = fsck(store)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert check(Store(tmp_path / "nothing-here")) == []


def test_a_corrupt_blob_is_named_and_never_removed(store, stored):
    blob = stored.blob
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    found = lines(store)
    assert len(found) == 1 and found[0].startswith(f"blobs/sha512/{stored.hex}: corrupt blob of image example.com/app")
    assert f"kvmpod image rm sha512-{stored.hex[:32]}" in found[0]
    result = fsck(store, "--repair")
    assert result.returncode == 1 and blob.exists()
    assert result.stdout.splitlines() == found
    assert result.stderr == f"kvmpod: error: image fsck: 1 problem in the store {store.root}\n"


def test_a_record_without_its_blob(store, stored):
    stored.blob.unlink()
    assert lines(store) == [f"images/{stored.hex}.json: image {stored.id} (example.com/app) has no blob: "
                            "it cannot run; import it again"]
    result = fsck(store)
    assert result.returncode == 1 and "(1 fixed by --repair)" in result.stderr
    result = fsck(store, "--repair")
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"repaired: removed the record of sha512-{stored.hex[:32]}")
    assert not (store.records / f"{stored.hex}.json").exists() and not (store.disks / f"{stored.hex}.iso").exists()
    assert check(store) == []


def test_an_unreadable_record_a_misfiled_one_and_a_wrong_size(store, stored, tmp_path):
    record_path = store.records / f"{stored.hex}.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "size": 7}))
    assert lines(store) == [f"images/{stored.hex}.json: image {stored.id} is recorded as 7 bytes, "
                            f"its blob has {stored.blob.stat().st_size}"]
    record_path.write_text(json.dumps({**record, "id": "sha512-" + "0" * 128}))
    assert f"images/{stored.hex}.json: record of image sha512-{'0' * 128} filed under another ID" in lines(store)
    record_path.write_text("{not json")
    found = lines(store)
    assert found[0] == (f"images/{stored.hex}.json: unreadable image record (the image is invisible; "
                        "its blob is an orphan)")
    assert f"blobs/sha512/{stored.hex}: blob without a record (an import that was cut short)" in found
    done, left = repair(store)
    assert left == [] and check(store) == []
    assert not stored.blob.exists()   # the orphan went with it, once its record had: said so
    assert any("unreadable record" in line for line in done) and any("orphan blob" in line for line in done)


def test_an_orphan_blob_is_left_alone_while_its_import_holds_the_lock(store, stored, tmp_path):
    (store.records / f"{stored.hex}.json").unlink()   # a kvmpod killed between the blob and its record
    with locks.exclusive(store.lock_file(stored.hex)):   # ...or one still importing
        assert not any(line.startswith("blobs/") for line in lines(store))
    assert f"blobs/sha512/{stored.hex}: blob without a record (an import that was cut short)" in lines(store)


def test_a_damaged_disk_and_an_orphan_disk(store, stored):
    disk = store.disks / f"{stored.hex}.iso"
    size = disk.stat().st_size
    with disk.open("r+b") as f:
        f.truncate(size - 2048)
    assert lines(store) == [f"rootfs/{stored.hex}.iso: damaged rootfs disk: the volume records {size} bytes, "
                            f"the file has {size - 2048} (the next run rebuilds it once removed)"]
    disk.write_bytes(b"\0" * 40960)
    assert "no ISO 9660 primary volume descriptor" in lines(store)[0]
    with locks.SharedLocks() as claim:   # a running pod's: the disk stays, the problem with it
        claim.add(store.use_file(stored.hex))
        done, left = repair(store)
        assert done == [] and len(left) == 1 and disk.exists()
    done, left = repair(store)
    assert (done, left) == ([f"removed the damaged rootfs disk {stored.hex}.iso"], [])
    orphan = store.disks / ("assembled-" + "a" * 64 + ".iso")
    orphan.write_bytes(b"")
    assert lines(store) == [f"rootfs/{orphan.name}: rootfs disk of no stored image"]
    assert repair(store)[1] == [] and not orphan.exists()


def test_stamps_leftovers_and_locks(store, stored):
    stamps = list(store.sources.iterdir())
    assert len(stamps) == 1
    stamp = json.loads(stamps[0].read_text())
    stamps[0].write_text(json.dumps({**stamp, "image_id": "sha512-" + "b" * 128}))
    (store.sources / ("c" * 64 + ".json")).write_text(json.dumps(stamp))   # filed under another source's key
    (store.sources / ("d" * 64 + ".json")).write_text("[")
    dead_tmp = store.tmp / f"import-{DEAD_PID}-x.tar"
    dead_tmp.write_bytes(b"partial")
    live_tmp = store.tmp / f"import-{os.getpid()}-y.tar"
    live_tmp.write_bytes(b"being written")
    dead_partial = store.records / f".{stored.hex}.json.{DEAD_PID}-abc.tmp"
    dead_partial.write_text("{")
    live_partial = store.disks / f".{stored.hex}.iso.{os.getpid()}-def.tmp"   # a disk being built: not a problem
    live_partial.write_bytes(b"")
    stale_lock = store.locks / ("e" * 128 + ".lock")
    stale_lock.write_bytes(b"")
    strange_lock = store.locks / "what"
    strange_lock.write_bytes(b"")
    held_lock = store.locks / ("f" * 128 + ".lock")   # an import that has not written anything else yet
    fd = os.open(held_lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (store.root / "stray").write_text("?")
    try:
        assert sorted(lines(store)) == sorted([
            "stray: unexpected entry in the store",
            f"images/{dead_partial.name}: partial write of a process that is gone",
            f"sources/{stamps[0].name}: stamp of {stamp['source']} names image sha512-{'b' * 32}…, which is not stored",
            f"sources/{'c' * 64}.json: stamp of {stamp['source']} filed under another key",
            f"sources/{'d' * 64}.json: unreadable source stamp",
            f"tmp/{dead_tmp.name}: temporary file of a process that is gone",
            f"locks/{strange_lock.name}: unexpected entry in the store",
        ])   # a lock file of no image is no problem (an import makes its own just before locking it)
        done, left = repair(store)
        assert sorted(p.line() for p in left) == [f"locks/{strange_lock.name}: unexpected entry in the store",
                                                  "stray: unexpected entry in the store"]
        assert len(done) == 5
        assert live_tmp.exists() and live_partial.exists() and held_lock.exists() and stale_lock.exists()
    finally:
        os.close(fd)


def test_image_gc_removes_dead_writers_partial_files_and_never_a_live_ones(store, stored):
    dead = store.disks / f".{stored.hex}.iso.{DEAD_PID}-abc.tmp"
    live = store.disks / f".{stored.hex}.iso.{os.getpid()}-def.tmp"
    live_stamp = store.sources / f".{'a' * 64}.json.{os.getpid()}-ghi.tmp"
    for path in (dead, live, live_stamp):
        path.write_bytes(b"")
    assert store.gc() == [f"partial write {dead.name}"]
    assert live.exists() and live_stamp.exists()
    assert not any(p.name.startswith(".") for p in store.locks.iterdir())


def test_a_check_while_imports_removals_and_gcs_run_finds_nothing(tmp_path):
    """Every state a store passes through while other kvmpod commands work on it is consistent to the
    check: an import between its blob and its record, a removal between its record and its blob, a disk
    being built, a stamp being written."""
    import threading

    store = Store(tmp_path / "store", limits=ImportLimits())
    acis = [make_aci(tmp_path / f"a{i}.aci", name=f"example.com/app{i}", files={"rootfs/f": os.urandom(1 << 20)})
            for i in range(3)]
    found: list[str] = []
    rounds = [0]
    done = threading.Event()

    def keep_checking() -> None:
        while not done.is_set():
            found.extend(p.line() for p in check(store))
            rounds[0] += 1

    checker = threading.Thread(target=keep_checking)
    checker.start()
    try:
        for _ in range(3):
            # imports racing gcs, then removals racing gcs and disk builds (an import racing a removal of
            # the same image may leave a stale stamp for real: not a state this test is after)
            for commands in ([["fetch", str(a)] for a in acis] + [["image", "gc"]] * 2,
                             [["image", "rm", f"example.com/app{i}"] for i in range(3)] + [["image", "gc"]]):
                procs = [subprocess.Popen([sys.executable, "-m", "kvmpod", "--dir", str(store.root), *args],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for args in commands]
                if commands[0][0] == "fetch":
                    for p in procs:
                        p.wait(timeout=60)
                    for a in acis:   # rootfs disks built while the check runs, and the removals then race them
                        store.rootfs_disk(store.import_aci(a))
                for p in procs:
                    assert p.wait(timeout=60) in (0, 125)   # an image removed by another `rm` first
    finally:
        done.set()
        checker.join()
    assert rounds[0] > 3
    assert found == [], '\n'.join(sorted(set(l.split(': ', 1)[1][:90] for l in found)))
    assert check(store) == []
