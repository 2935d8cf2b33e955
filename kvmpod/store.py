"""The image store: content-addressed image blobs and the rootfs disk built once per image ID.

Layout (docs/layout.md):
    <store>/blobs/sha512/<hex>   the image's uncompressed tar (its ID is the sha512 of exactly these bytes)
    <store>/rootfs/<hex>.iso     the rootfs disk (ISO 9660 + Rock Ridge) the VM boots from
    <store>/tmp/                 partial writes; renamed into place when complete
    <store>/locks/<hex>.lock     flock()ed while an image is imported or its disk is built
Every write goes to tmp/ and is renamed into place, so a crash never leaves a corrupt entry,
and the per-image lock means concurrent kvmpod processes never build the same disk twice.
"""

from __future__ import annotations

import fcntl
import os
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from kvmpod import paths
from kvmpod.errors import ImageError
from kvmpod.image.archive import decompress_to
from kvmpod.image.manifest import ImageManifest, parse_manifest


@dataclass(frozen=True)
class StoredImage:
    id: str                 # "sha512-<128 hex>"
    blob: Path              # uncompressed tar
    manifest: ImageManifest

    @property
    def hex(self) -> str:
        return self.id.removeprefix("sha512-")


class Store:
    def __init__(self, root: Path | None = None):
        self.root = root or paths.store_dir()
        self.blobs = self.root / "blobs" / "sha512"
        self.disks = self.root / "rootfs"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"

    def _ensure_dirs(self) -> None:
        for d in (self.blobs, self.disks, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with open(self.locks / f"{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def import_aci(self, path: Path) -> StoredImage:
        """Store the ACI at `path` (any supported compression) and return it with its parsed manifest."""
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        self._ensure_dirs()
        fd, tmp_name = tempfile.mkstemp(prefix="import-", suffix=".tar", dir=self.tmp)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as dest:
                image_id = decompress_to(path, dest)
            blob = self.blobs / image_id.removeprefix("sha512-")
            manifest = read_aci_manifest(tmp, path)
            check_rootfs_entries(tmp, path)  # a hostile archive never enters the store
            with self._lock(blob.name):
                if blob.exists():
                    tmp.unlink()
                else:
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, blob)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredImage(image_id, blob, manifest)

    def rootfs_disk(self, image: StoredImage) -> Path:
        """The image's rootfs ISO, built on first use; later calls (any process) reuse it."""
        disk = self.disks / f"{image.hex}.iso"
        if disk.exists():
            return disk
        from kvmpod.disk.entries import entries_from_tar  # heavy (pycdlib): only when a disk is built
        from kvmpod.disk.iso import build_iso

        self._ensure_dirs()
        with self._lock(image.hex):
            if not disk.exists():  # another process may have built it while we waited
                with tarfile.open(image.blob, "r:") as tar:
                    build_iso(entries_from_tar(tar), disk)
        return disk


def check_rootfs_entries(tar_path: Path, shown_as: Path) -> None:
    """Run every rootfs/ entry through the disk builder's safety checks (headers only, no data read)."""
    from kvmpod.disk.entries import entries_from_tar
    from kvmpod.errors import DiskError

    try:
        with tarfile.open(tar_path, "r:") as tar:
            for _ in entries_from_tar(tar):
                pass
    except tarfile.TarError as e:
        raise ImageError(f"{shown_as}: not a valid tar archive: {e}") from None
    except (ImageError, DiskError) as e:
        raise ImageError(f"{shown_as}: {e}") from None


def read_aci_manifest(tar_path: Path, shown_as: Path) -> ImageManifest:
    """Parse the top-level `manifest` of an uncompressed ACI tar and check the ACI layout basics."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            member = None
            has_rootfs = False
            for m in tar:
                name = m.name.removeprefix("./")
                if name == "manifest":
                    if member is not None:
                        raise ImageError(f"{shown_as}: manifest: the archive holds it twice")
                    member = m
                elif name == "rootfs" or name.startswith("rootfs/"):
                    has_rootfs = True
            if member is None:
                raise ImageError(f"{shown_as}: not an ACI: no top-level 'manifest' file")
            if not member.isfile():
                raise ImageError(f"{shown_as}: manifest: is not a regular file")
            if not has_rootfs:
                raise ImageError(f"{shown_as}: not an ACI: no 'rootfs/' directory")
            f = tar.extractfile(member)
            assert f is not None
            data = f.read(member.size)
    except tarfile.TarError as e:
        raise ImageError(f"{shown_as}: not a valid tar archive: {e}") from None
    try:
        return parse_manifest(data)
    except ImageError as e:
        raise ImageError(f"{shown_as}: {e}") from None
