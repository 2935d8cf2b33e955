"""`kvmpod image fsck`: the store checked against its own rules (docs/store.md), one problem per line.

What is checked:
    blobs/sha512/<hex>      the sha512 of its bytes is its name; it has a record (else: an orphan)
    images/<hex>.json       it reads, its ID is its name, its manifest validates, its blob is there and
                            of the recorded size
    rootfs/<key>.iso        some image's disk key (else: an orphan); an ISO 9660 volume whose recorded
                            size is the file's (a disk cut short)
    sources/<key>.json      it reads, is filed under its source's key, names a stored image
    layers/<alg>/<hex>      blobs pulled from registries: the digest of its bytes is its name; a stored
                            image needs it (kvmpod/store/layers.py), unless a pull is running
    tmp/, .<name>.<pid>-*.tmp   partial writes of processes that are gone
    locks/                  names only (a lock file of no image is no problem: `image gc` removes it)
    anything else           unexpected entries

Safe while other kvmpod commands run: it holds locks/maintenance.lock shared, which `image rm` and
`image gc` hold exclusively (it never sees an image half removed); an entry being written (its
writer's lock held, or its temp file's pid alive) is not a problem; and every finding is confirmed
once more before it is reported. With `repair`, what can be fixed without losing anything that is not
lost already is fixed: orphans, leftovers and stale stamps go (as `image gc` removes them), a damaged disk goes (the next run
rebuilds it), a record whose blob is gone goes (the image could not run anyway: import it again). A
blob whose bytes no longer match its ID is never removed: that is for `kvmpod image rm`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmpod.errors import ImageError, KvmpodError
from kvmpod.fsutil import abandoned_temp, pid_alive
from kvmpod.image.manifest import parse_manifest
from kvmpod.store import index, locks
from kvmpod.store.layers import LOCK_KEY as LAYERS_LOCK_KEY
from kvmpod.store.rootfs import disk_key, resolve_chain
from kvmpod.store.store import Store

HEX_ID = re.compile(r"^[0-9a-f]{128}$")
TMP_NAME = re.compile(r"^(?P<what>[a-z]+)-(?P<pid>\d+)-")         # tmp/<what>-<pid>-<random>
SECTOR = 2048
TOP_LEVEL = {"blobs", "images", "rootfs", "sources", "tmp", "locks", "layers"}


@dataclass
class Problem:
    path: Path          # relative to the store
    what: str
    fix: Callable[[], str | None] | None = None   # does the repair: what it did, or None if it could not now

    def line(self) -> str:
        return f"{self.path}: {self.what}"


class StoreCheck:
    def __init__(self, store: Store):
        self.store = store
        self.problems: list[Problem] = []

    # -- helpers -----------------------------------------------------------------------------

    def _add(self, path: Path, what: str, fix: Callable[[], str | None] | None = None) -> None:
        self.problems.append(Problem(path.relative_to(self.store.root), what, fix))

    def _records(self) -> dict[str, index.ImageRecord]:
        return {r.hex: r for r in self.store.list_records()}

    def _live_disks(self) -> set[str]:
        live = set()
        for record in self._records().values():
            try:
                image = self.store._image(record)   # as `image gc` sees it: a record without blob counts
                live.add(disk_key(image, resolve_chain(self.store.find, image)))
            except (ImageError, KvmpodError):
                pass
        return live

    # -- the checks ------------------------------------------------------------------------------

    def run(self) -> list[Problem]:
        root = self.store.root
        if not root.exists():
            return []
        for entry in _listdir(root):
            if entry.name not in TOP_LEVEL:
                self._add(entry, "unexpected entry in the store")
        blobs_parent = root / "blobs"
        for entry in _listdir(blobs_parent):
            if entry.name != "sha512":
                self._add(entry, "unexpected entry in the store")
        if not self.store.locks.is_dir():   # nothing was ever stored
            return self.problems
        with self.store.maintenance(shared=True):   # no `image rm` or `image gc` half done meanwhile
            self._check_records()
            self._check_blobs()
            self._check_disks()
            self._check_stamps()
            self._check_tmp()
            self._check_locks()
            self._check_layers()
        return self.problems

    def _check_layers(self) -> None:
        """The layer cache: every blob has the digest it is named by, and a stored image needs it
        (not judged while a pull runs: its blobs are not needed by a record yet)."""
        cache = self.store.layer_cache
        pulls = self.store.use_file(LAYERS_LOCK_KEY)
        live = cache.referenced(self._records().values()) if not pulls.exists() or _lock_free(pulls) else None
        for algorithm_dir in _listdir(cache.dir):
            if algorithm_dir.name not in ("sha256", "sha512") or not algorithm_dir.is_dir():
                self._add(algorithm_dir, "unexpected entry in the store")
                continue
            for blob in _listdir(algorithm_dir):
                digest = f"{algorithm_dir.name}:{blob.name}"
                try:
                    with blob.open("rb") as f:
                        actual = hashlib.file_digest(f, algorithm_dir.name).hexdigest()
                except FileNotFoundError:
                    continue
                if actual != blob.name:
                    self._add(blob, f"pulled blob's bytes do not match its digest {digest} (the next pull "
                                    "downloads it again)", _unlink_fix(blob, "the damaged pulled blob"))
                elif live is not None and digest not in live:
                    self._add(blob, "pulled blob no stored image needs", self._unneeded_blob_fix(blob, digest))

    def _unneeded_blob_fix(self, blob: Path, digest: str) -> Callable[[], str | None]:
        def fix() -> str | None:
            with locks.try_exclusive(self.store.use_file(LAYERS_LOCK_KEY)) as no_pull:
                if not no_pull or digest in self.store.layer_cache.referenced(self._records().values()):
                    return None
                blob.unlink(missing_ok=True)
            return f"removed the pulled blob {digest}"
        return fix

    def _check_records(self) -> None:
        store = self.store
        for path in _listdir(store.records):
            if self._leftover(path):
                continue
            name = path.name.removesuffix(".json")
            if not path.name.endswith(".json") or not HEX_ID.match(name):
                self._add(path, "unexpected entry in the store")
                continue
            record = index.read_record(path)
            if record is None:
                if path.exists():
                    self._add(path, "unreadable image record (the image is invisible; its blob is an orphan)",
                              self._remove_record_fix(name, path, "the unreadable record"))
                continue
            if record.id != f"sha512-{name}":
                self._add(path, f"record of image {record.id} filed under another ID")
                continue
            try:
                parse_manifest(json.dumps(record.manifest).encode())
            except (KvmpodError, ValueError) as e:
                self._add(path, f"the recorded manifest does not validate: {e}")
            blob = store.blobs / name
            try:
                size = blob.stat().st_size
            except FileNotFoundError:
                # `image rm` removes the record before the blob: a record still there after its blob is gone is torn
                if path.exists():
                    self._add(path, f"image {record.id} ({record.name}) has no blob: it cannot run; "
                                    "import it again", self._remove_record_fix(name, path, "the record"))
                continue
            if size != record.size:
                self._add(path, f"image {record.id} is recorded as {record.size} bytes, its blob has {size}")

    def _remove_record_fix(self, hex_id: str, path: Path, what: str) -> Callable[[], str | None]:
        def fix() -> str | None:
            store = self.store
            with locks.try_exclusive(store.use_file(hex_id)) as free:
                if not free:
                    return None
                with locks.exclusive(store.lock_file(hex_id)):
                    path.unlink(missing_ok=True)
                    (store.disks / f"{hex_id}.iso").unlink(missing_ok=True)
            return f"removed {what} of sha512-{hex_id[:32]} (import the image again to use it)"
        return fix

    def _check_blobs(self) -> None:
        store = self.store
        for blob in _listdir(store.blobs):
            if not HEX_ID.match(blob.name) or not _is_file(blob):
                if blob.exists():   # (else removed meanwhile)
                    self._add(blob, "unexpected entry in the store")
                continue
            try:
                actual = _sha512(blob)
            except FileNotFoundError:
                continue   # removed meanwhile (`image rm`, `image gc`)
            record_path = store.records / f"{blob.name}.json"
            recorded = index.read_record(record_path)
            if actual != blob.name:
                named = f" of image {recorded.name}" if recorded else ""
                self._add(blob, f"corrupt blob{named}: its content hashes to sha512-{actual[:32]}…; "
                                f"remove the image (`kvmpod image rm sha512-{blob.name[:32]}`) and import it again")
                continue
            if recorded is not None or not _lock_free(store.lock_file(blob.name)):
                continue   # a recorded image's, or one being imported (its lock is held until its record is written)
            if index.read_record(record_path) is None and blob.exists():
                self._add(blob, "blob without a record (an import that was cut short)", self._orphan_blob_fix(blob))

    def _orphan_blob_fix(self, blob: Path) -> Callable[[], str | None]:
        def fix() -> str | None:
            with locks.try_exclusive(self.store.lock_file(blob.name)) as free:
                if not free or index.read_record(self.store.records / f"{blob.name}.json") is not None:
                    return None
                blob.unlink(missing_ok=True)
            return f"removed the orphan blob sha512-{blob.name[:32]}"
        return fix

    def _check_disks(self) -> None:
        store = self.store
        live = self._live_disks()
        for disk in _listdir(store.disks):
            if self._leftover(disk):
                continue
            key = disk.name.removesuffix(".iso")
            if not disk.name.endswith(".iso") or not _is_file(disk):
                if disk.exists():
                    self._add(disk, "unexpected entry in the store")
                continue
            if key not in live and key not in self._live_disks():   # confirmed: an image imported meanwhile
                if _lock_free(store.use_file(key)) and disk.exists():
                    self._add(disk, "rootfs disk of no stored image", self._disk_fix(disk, key, "orphan"))
                continue
            if why := _iso_damage(disk):
                self._add(disk, f"damaged rootfs disk: {why} (the next run rebuilds it once removed)",
                          self._disk_fix(disk, key, "damaged"))

    def _disk_fix(self, disk: Path, key: str, what: str) -> Callable[[], str | None]:
        def fix() -> str | None:
            with locks.try_exclusive(self.store.use_file(key)) as free:
                if not free:
                    return None
                with locks.exclusive(self.store.lock_file(key)):
                    disk.unlink(missing_ok=True)
            return f"removed the {what} rootfs disk {disk.name}"
        return fix

    def _check_stamps(self) -> None:
        store = self.store
        for path in _listdir(store.sources):
            if self._leftover(path):
                continue
            if not path.name.endswith(".json"):
                self._add(path, "unexpected entry in the store")
                continue
            stamp = index.read_stamp(path)
            if stamp is None:
                if path.exists():
                    self._add(path, "unreadable source stamp", _unlink_fix(path, "the unreadable stamp"))
                continue
            if path.name != f"{index.source_key(stamp.source)}.json":
                self._add(path, f"stamp of {stamp.source} filed under another key", _unlink_fix(path, "the stamp"))
                continue
            hex_id = stamp.image_id.removeprefix("sha512-")
            if not (store.records / f"{hex_id}.json").exists() and path.exists():
                self._add(path, f"stamp of {stamp.source} names image {stamp.image_id[:39]}…, which is not stored",
                          _unlink_fix(path, "the stale stamp"))

    def _check_tmp(self) -> None:
        for path in _listdir(self.store.tmp):
            m = TMP_NAME.match(path.name)
            if m is None or not pid_alive(int(m.group("pid"))):
                self._add(path, "temporary file of a process that is gone", _unlink_fix(path, "the temporary file"))

    def _check_locks(self) -> None:
        """Only the names: a lock file of no image is no problem. An import makes its image's a moment
        before it locks it and writes the record (tests/unit/test_store_check.py caught that moment), and
        whatever is left of a removed image's, `image gc` removes."""
        for lock in _listdir(self.store.locks):
            key, dot, kind = lock.name.rpartition(".")
            if not dot or kind not in ("lock", "use") or not key:
                self._add(lock, "unexpected entry in the store")

    def _leftover(self, path: Path) -> bool:
        """Is `path` a hidden temp file (write_atomically's, the disk writer's)? Reported if its writer is gone."""
        dead = abandoned_temp(path)
        if dead is None:
            return False
        if dead:
            self._add(path, "partial write of a process that is gone", _unlink_fix(path, "the partial write"))
        return True


def check(store: Store) -> list[Problem]:
    """Every problem of the store, in the order checked."""
    return StoreCheck(store).run()


def repair(store: Store, problems: list[Problem] | None = None) -> tuple[list[str], list[Problem]]:
    """Fix what can be fixed (of `problems`, default: check(store)), in rounds: a record removed makes
    its stamps and locks stale. Returns what was done and the problems left, seen afresh."""
    done: list[str] = []
    left = check(store) if problems is None else problems
    for _ in range(3):
        fixed = [result for problem in left if problem.fix and (result := problem.fix()) is not None]
        if not fixed:
            break
        done += fixed
        left = check(store)
    return done, left


def _unlink_fix(path: Path, what: str) -> Callable[[], str | None]:
    def fix() -> str | None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return f"removed {what} {path.name}"
    return fix


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _lock_free(path: Path) -> bool:
    """Nobody holds a lock on `path` (which is not created: a check writes no lock file but its own)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _iso_damage(disk: Path) -> str | None:
    """Why `disk` is not a whole ISO 9660 volume (docs/disk.md), or None: its primary volume descriptor
    is where it belongs and the volume size it records is the file's."""
    try:
        size = disk.stat().st_size
        with disk.open("rb") as f:
            f.seek(16 * SECTOR)
            pvd = f.read(SECTOR)
    except FileNotFoundError:
        return None
    if len(pvd) < SECTOR or pvd[:6] != b"\x01CD001":
        return "no ISO 9660 primary volume descriptor"
    volume = struct.unpack_from("<I", pvd, 80)[0] * SECTOR
    if volume != size:
        return f"the volume records {volume} bytes, the file has {size}"
    return None


def _listdir(d: Path) -> list[Path]:
    try:
        return sorted(d.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
