"""The image store: validated images by ID, an index to find them by name, their rootfs disks.

Layout and locking are specified in docs/store.md:
    <store>/blobs/sha512/<hex>   the image's uncompressed tar (its ID is the sha512 of exactly these bytes)
    <store>/images/<hex>.json    its index record (kvmpod/store/index.py)
    <store>/rootfs/<key>.iso     a rootfs disk (ISO 9660 + Rock Ridge) the VM boots from
    <store>/sources/<key>.json   stamps of imported files, so an unchanged file is not read again
    <store>/layers/<alg>/<hex>   blobs pulled from registries (kvmpod/store/layers.py)
    <store>/tmp/                 partial writes, renamed into place when complete
    <store>/locks/               flock files (kvmpod/store/locks.py)
A blob is renamed into place before its record is written and removed after its record, so a record
always has its blob; `image gc` clears what a crash between the two steps left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from kvmpod import faults, paths
from kvmpod.config import bool_setting
from kvmpod.errors import ImageError, ManifestError
from kvmpod.fsutil import abandoned_temp, pid_alive
from kvmpod.image.aci import CheckedRootfs, check_aci_keeping
from kvmpod.image.archive import decompress_to
from kvmpod.image.limits import ImportLimits, human_size
from kvmpod.image.signature import (SIGNATURE_SUFFIX, UNVERIFIED, SignatureCheck, admit, check_signature,
                                    signature_path)
from kvmpod.image.transfer import Transfer
from kvmpod.image.manifest import ImageManifest, parse_manifest
from kvmpod.progress import progress
from kvmpod.store import index, locks
from kvmpod.store.index import SIGNATURE_NOT_CHECKED, ImageRecord, SourceStamp
from kvmpod.store.layers import LOCK_KEY as LAYERS_LOCK_KEY, LayerCache
from kvmpod.store.refs import DockerRef, FileRef, IdRef, NameRef, OciRef, UrlRef, parse_image_ref
from kvmpod.store.rootfs import build_rootfs_disk, disk_key, resolve_chain
from kvmpod.store.stored import StoredImage

if TYPE_CHECKING:
    from kvmpod.image.oci import OciReference
    from kvmpod.image.registry.reference import DockerReference

def _notice(message: str) -> None:
    print(f"kvmpod: notice: {message}", file=sys.stderr, flush=True)


MAINTENANCE_KEY = "maintenance"   # locks/maintenance.lock (Store.maintenance)
_TMP_NAME = re.compile(r"^(?P<what>[a-z]+)-(?P<pid>\d+)-")


class Store:
    def __init__(self, root: Path | None = None, limits: ImportLimits | None = None,
                 notify: Callable[[str], None] | None = None, transfer: Transfer = Transfer()):
        self.root = root or paths.store_dir()
        self.transfer = transfer  # --insecure-options and --ca-file of this command (kvmpod/image/transfer.py)
        self.notify = notify or _notice  # one-line notices (an unverifiable signature)
        self._limits = limits
        self.blobs = self.root / "blobs" / "sha512"
        self.records = self.root / "images"
        self.disks = self.root / "rootfs"
        self.sources = self.root / "sources"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.layer_cache = LayerCache(self.root)  # blobs pulled from registries (kvmpod/store/layers.py)
        # The last import's checked rootfs entries (kvmpod/image/aci.py), for its rootfs_disk: one slot,
        # so that a process importing many images holds one archive's entries and one descriptor.
        self._checked: tuple[str, CheckedRootfs] | None = None

    @property
    def limits(self) -> ImportLimits:
        if self._limits is None:
            self._limits = ImportLimits.from_config()
        return self._limits

    def _ensure_dirs(self) -> None:
        for d in (self.blobs, self.records, self.disks, self.sources, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    def lock_file(self, key: str) -> Path:
        return self.locks / f"{key}.lock"

    def use_file(self, key: str) -> Path:
        return self.locks / f"{key}.use"

    @contextmanager
    def temp_file(self, what: str, suffix: str = "") -> Iterator[Path]:
        """A file in tmp/ removed on the way out unless renamed; its name carries our pid for `image gc`."""
        self._ensure_dirs()
        fd, name = tempfile.mkstemp(prefix=f"{what}-{os.getpid()}-", suffix=suffix, dir=self.tmp)
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    # --- import ---------------------------------------------------------------------------

    def import_ref(self, text: str) -> StoredImage:
        """`kvmpod fetch` / `image import`: a file, URL or Docker/OCI source into the store."""
        ref = parse_image_ref(text)
        if isinstance(ref, FileRef):
            return self.import_aci(ref.path)
        if isinstance(ref, UrlRef):
            return self.import_url(ref.url)
        if isinstance(ref, OciRef):
            return self.import_oci(ref.text)
        if isinstance(ref, DockerRef):
            return self.import_docker(ref.reference)
        if isinstance(ref, NameRef):
            return self.find_or_discover(ref)
        raise ImageError(f"{text}: not a file, URL, image name or docker-archive:/oci-archive:/oci: source")

    def resolve(self, text: str) -> StoredImage:
        """`kvmpod run IMAGE`: anything parse_image_ref accepts; an ID must be in the store, a name is
        discovered (spec/discovery.md) when it is not; a `docker://` reference pulled before is not
        pulled again (rkt's and podman's default for run; `kvmpod fetch` asks the registry)."""
        ref = parse_image_ref(text)
        if isinstance(ref, IdRef):
            return self._admitted(self.find(ref), text)
        if isinstance(ref, NameRef):
            return self.find_or_discover(ref)
        if isinstance(ref, DockerRef) and (pulled := self.pulled_before(ref.reference)) is not None:
            return self._admitted(pulled, text)
        return self.import_ref(text)

    def pulled_before(self, ref: DockerReference) -> StoredImage | None:
        """The newest stored image pulled from this reference (its record's source is the reference
        and the digest it resolved to), if it is still whole."""
        wanted = str(ref) if ref.digest else f"{ref}@"
        for record in reversed(self.list_records()):
            if (record.source == wanted if ref.digest else record.source.startswith(wanted)) \
                    and (self.blobs / record.hex).is_file():
                return self._image(record)
        return None

    def find_or_discover(self, ref: NameRef) -> StoredImage:
        """The newest stored image of this name and labels, else the one appc discovery finds."""
        try:
            record = self.find_record(ref)
        except ImageError:
            if not bool_setting("discovery", "image", True):  # an offline host: names are the store's only
                raise
            return self.import_discovered(ref)
        return self._admitted(self._image(record), str(ref))

    def _admitted(self, image: StoredImage, shown: str) -> StoredImage:
        """A stored image, if the signature policy lets it run now (its recorded signature status)."""
        check = admit(image.manifest.name, SignatureCheck(image.signature), shown, self.transfer.insecure.image)
        if check.notice:
            self.notify(check.notice)
        return image

    def _admitted_dependency(self, image: StoredImage, ref: IdRef | NameRef) -> StoredImage:
        """A dependency of `image`, under the signature policy as any image run: a trusted prefix's unsigned
        image must not enter a pod by being named as another image's dependency."""
        shown = str(ref) if isinstance(ref, NameRef) else f"sha512-{ref.hex_prefix}"
        return self._admitted(self.find(ref), f"{image.manifest.name}: dependency {shown}")

    def import_aci(self, path: Path) -> StoredImage:
        """Store the ACI at `path` (any supported compression) and return it with its parsed manifest.

        A file imported before and unchanged since (same inode, size, mtime and ctime) is not read again."""
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        source = str(path.resolve())
        signature = signature_path(path)
        if cached := self._cached_source(source, path, signature):
            return cached
        # before any work: a bad signature stops here (the policy, which needs the name, comes later)
        check = check_signature(path, signature, str(path), self.transfer.insecure.image)
        with self.temp_file("import", ".tar") as tmp:
            with tmp.open("wb") as dest, progress(f"importing {path.name}", path.stat().st_size) as advance:
                image_id = decompress_to(path, dest, self.limits, advance)
            image = self._store_tar(tmp, image_id, path, source, check.status, check=check)
        if check.notice:
            self.notify(check.notice)
        self._remember_source(source, path, image.id, signature)
        return image

    def import_url(self, url: str) -> StoredImage:
        from kvmpod.image.fetch import download  # urllib.request (http.client, ssl): only for a URL

        with self.temp_file("download") as tmp, self.temp_file("download", SIGNATURE_SUFFIX) as sig:
            download(url, tmp, self.limits, transfer=self.transfer)
            signed = download(url + SIGNATURE_SUFFIX, sig, self.limits, missing_ok=True, transfer=self.transfer)
            check = check_signature(tmp, sig if signed else None, url, self.transfer.insecure.image,
                                    url.rsplit("/", 1)[-1] + SIGNATURE_SUFFIX)
            with self.temp_file("import", ".tar") as tar, tar.open("wb") as dest:
                image_id = decompress_to(tmp, dest, self.limits)
                dest.close()
                image = self._store_tar(tar, image_id, Path(url), url, check.status, check=check)
        if check.notice:
            self.notify(check.notice)
        return image

    def import_discovered(self, ref: NameRef) -> StoredImage:
        """appc discovery (kvmpod/image/discovery.py): find the ACI and its signature by name, download,
        verify, import; the manifest must have the name and labels asked for (spec/discovery.md)."""
        from kvmpod.image.discovery import discover, host_labels
        from kvmpod.image.fetch import download

        labels = {**host_labels(), **ref.labels}
        try:
            found = discover(ref.name, labels, self.transfer)
        except ImageError as e:
            raise ImageError(f"{ref}: no such image in the store, and appc discovery failed: {e}") from e
        hint = ", ".join(found.pubkeys)
        for url in (found.aci, found.signature):
            self.transfer.check_url(url)
        with self.temp_file("download", ".aci") as tmp, self.temp_file("download", SIGNATURE_SUFFIX) as sig:
            if not download(found.aci, tmp, self.limits, missing_ok=True, transfer=self.transfer):
                raise ImageError(f"{ref}: {found.aci}: HTTP 404 Not Found (found by {found.how})")
            signed = download(found.signature, sig, self.limits, missing_ok=True, transfer=self.transfer)
            check = check_signature(tmp, sig if signed else None, found.aci, self.transfer.insecure.image,
                                    found.signature.rsplit("/", 1)[-1])

            def expect(manifest: ImageManifest) -> None:
                # a label asked for must be there with that value; os/arch (ours) must match where given
                asked = {k: v for k, v in labels.items() if k in ref.labels or k in manifest.labels}
                wrong = [f"{k}={manifest.labels.get(k, '(none)')}" for k, v in asked.items()
                         if manifest.labels.get(k) != v]
                if manifest.name != ref.name or wrong:
                    got = ", ".join([*([f"name {manifest.name}"] if manifest.name != ref.name else []), *wrong])
                    raise ImageError(f"{found.aci}: discovered for {ref} but its manifest says {got}: refused")

            with self.temp_file("import", ".tar") as tar, tar.open("wb") as dest:
                image_id = decompress_to(tmp, dest, self.limits)
                dest.close()
                image = self._store_tar(tar, image_id, Path(found.aci), found.aci, check.status, check=check,
                                        expect=expect, hint=hint)
        if check.notice:
            self.notify(check.notice)
        return image

    def import_oci(self, text: str) -> StoredImage:
        """Convert a Docker/OCI image to an ACI and store it; an unchanged source is not converted again."""
        from kvmpod.image.oci import parse_reference  # the converter's modules: only for such sources

        ref = parse_reference(text)
        if ref is None:
            raise ImageError(f"{text}: not a docker-archive:, oci-archive: or oci: reference")
        source_path = Path(ref.path)
        source = ref.canonical()  # the same image however the path was spelled
        stamp_path = source_path / "index.json" if source_path.is_dir() else source_path
        if cached := self._cached_source(source, stamp_path):
            return cached
        with self.temp_dir("convert") as work:
            image = self._convert_oci(ref, work, text, source_path.name, source)
        self._remember_source(source, stamp_path, image.id)
        return image

    def import_docker(self, ref: DockerReference) -> StoredImage:
        """Pull a `docker://` image from its registry, convert it like an `oci:` layout, store it.

        The manifest is always asked for (a tag moves); blobs already in the layer cache are not
        downloaded again, and an image already converted from the same manifest is not converted
        again (its stamp is on the cached manifest). The record's source is the reference with the
        digest it resolved to. Nothing reaches the layer cache before the image is stored."""
        from kvmpod.image.oci import OciReference
        from kvmpod.image.registry.client import RegistryClient  # urllib, ssl: only for a pull
        from kvmpod.image.registry.pull import resolve, write_layout

        self._ensure_dirs()
        client = RegistryClient(ref, self.transfer, self.limits)
        with locks.SharedLocks() as pulling:
            pulling.add(self.use_file(LAYERS_LOCK_KEY))  # `image gc` leaves the layer cache alone meanwhile
            resolved = resolve(client, self.layer_cache.find)
            source = ref.resolved(resolved.top_digest)
            stamp_path = self.layer_cache.path(resolved.manifest.digest)
            if cached := self._cached_source(source, stamp_path):
                return cached
            with self.temp_dir("pull") as work:
                (work / "layout").mkdir()
                layout = write_layout(client, resolved, work / "layout", self.layer_cache.find)
                image = self._convert_oci(OciReference("oci", layout.path, layout.tag), work, str(ref), str(ref),
                                          source, shown=str(ref))
                self.layer_cache.adopt(layout.path, layout.blobs)
            self._remember_source(source, stamp_path, image.id)
        return image

    @contextmanager
    def temp_dir(self, what: str) -> Iterator[Path]:
        """A directory in tmp/ removed with everything in it on the way out (named like temp_file's)."""
        with self.temp_file(what) as path:
            path.unlink()
            path.mkdir()
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)

    def _convert_oci(self, ref: OciReference, work: Path, text: str, label: str, source: str,
                     shown: str | None = None) -> StoredImage:
        """Convert the Docker/OCI image `ref` (temporary files in `work`) and store the ACI."""
        from kvmpod.image.oci import convert

        with self.temp_file("import", ".tar") as tmp:
            digest = hashlib.sha512()
            with tmp.open("wb") as raw:
                # the tar writer needs only write() and flush(), which _HashingWriter has
                out = cast(BinaryIO, _HashingWriter(raw, digest, self.limits.max_size, text))
                with progress(f"converting {label}", None) as advance:
                    convert(ref, out, tmp_dir=work, progress=advance, limits=self.limits, shown=shown)
            return self._store_tar(tmp, "sha512-" + digest.hexdigest(), Path(text), source, SIGNATURE_NOT_CHECKED)

    def _store_tar(self, tmp: Path, image_id: str, shown_as: Path, source: str, signature: str,
                   check: SignatureCheck | None = None, expect: Callable[[ImageManifest], None] | None = None,
                   hint: str = "") -> StoredImage:
        """Check the uncompressed ACI tar `tmp` and move it into the store under `image_id`, if the
        signature policy admits its name with this signature (`check`, else the status `signature`)."""

        def admitted(manifest: ImageManifest) -> None:
            if expect is not None:
                expect(manifest)
            given = check or SignatureCheck(signature)
            outcome = admit(manifest.name, given, str(shown_as), self.transfer.insecure.image, hint)
            if outcome.notice and outcome is not given:
                self.notify(outcome.notice)

        faults.at("import")
        hex_id = image_id.removeprefix("sha512-")
        record_path = self.records / f"{hex_id}.json"
        if (existing := index.read_record(record_path)) and (self.blobs / hex_id).is_file():
            admitted(self._image(existing).manifest)
            if _signature_rank(signature) > _signature_rank(existing.signature):  # e.g. now verified
                existing = dataclasses.replace(existing, signature=signature)
                with locks.exclusive(self.lock_file(hex_id)):
                    index.write_record(record_path, existing)
            return self._image(existing)  # the same bytes were checked when first imported
        # a hostile archive never enters the store
        raw_manifest, checked = check_aci_keeping(tmp, shown_as, self.limits)
        try:
            try:
                manifest = parse_manifest(raw_manifest)
            except ManifestError as e:
                raise ManifestError(f"{shown_as}: {e}") from e
            admitted(manifest)
            blob = self.blobs / hex_id
            with locks.exclusive(self.lock_file(hex_id)):
                if not blob.is_file():
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, blob)
                    faults.at("import-commit")
                record = index.read_record(record_path) or ImageRecord(
                    id=image_id, name=manifest.name, labels=dict(manifest.labels), imported=time.time(),
                    size=blob.stat().st_size, source=source, signature=signature, manifest=manifest.raw)
                index.write_record(record_path, record)
        except BaseException:
            if checked is not None:
                checked.close()
            raise
        self._keep_checked(image_id, checked)
        return StoredImage(image_id, blob, manifest, record.signature)

    def _keep_checked(self, image_id: str, checked: CheckedRootfs | None) -> None:
        old, self._checked = self._checked, (image_id, checked) if checked is not None else None
        if old is not None:
            old[1].close()

    def _take_checked(self, image_id: str) -> CheckedRootfs | None:
        """The entries the import of `image_id` checked, if it was this Store's last import (then forgotten)."""
        kept, self._checked = self._checked, None
        if kept is not None and kept[0] != image_id:
            kept[1].close()
            return None
        return kept[1] if kept is not None else None

    def _stamp_file(self, source: str) -> Path:
        return self.sources / f"{index.source_key(source)}.json"

    def _cached_source(self, source: str, path: Path, signature: Path | None = None) -> StoredImage | None:
        """The stored image of an unchanged source — and an unchanged signature beside it, so that a
        signature added, replaced or removed since is checked again."""
        stamp = index.read_stamp(self._stamp_file(source))
        now = SourceStamp.of(source, path, "")
        if stamp is None or now is None or not stamp.same_file(now):
            return None
        if signature is not None:
            sig_stamp = index.read_stamp(self._stamp_file(source + SIGNATURE_SUFFIX))
            sig_now = SourceStamp.of(source + SIGNATURE_SUFFIX, signature, "")
            if (sig_stamp is None) != (sig_now is None) or (sig_stamp and sig_now and not sig_stamp.same_file(sig_now)):
                return None
        try:
            image = self.get(stamp.image_id)
        except ImageError:
            return None  # removed since: import again
        return self._admitted(image, source)

    def _remember_source(self, source: str, path: Path, image_id: str, signature: Path | None = None) -> None:
        if stamp := SourceStamp.of(source, path, image_id):
            index.write_stamp(self._stamp_file(source), stamp)
        if signature is not None:
            if sig_stamp := SourceStamp.of(source + SIGNATURE_SUFFIX, signature, image_id):
                index.write_stamp(self._stamp_file(source + SIGNATURE_SUFFIX), sig_stamp)
            else:
                self._stamp_file(source + SIGNATURE_SUFFIX).unlink(missing_ok=True)

    # --- lookup ---------------------------------------------------------------------------

    def list_records(self) -> list[ImageRecord]:
        """Every image in the store, oldest import first."""
        if not self.records.is_dir():
            return []
        records = [r for p in self.records.glob("*.json") if (r := index.read_record(p))]
        return sorted(records, key=lambda r: (r.imported, r.id))

    def _image(self, record: ImageRecord) -> StoredImage:
        import json

        manifest = parse_manifest(json.dumps(record.manifest).encode(), validate=False)
        return StoredImage(record.id, self.blobs / record.hex, manifest, record.signature)

    def get(self, image_id: str) -> StoredImage:
        """The image with this full ID."""
        hex_id = image_id.removeprefix("sha512-")
        record = index.read_record(self.records / f"{hex_id}.json")
        if record is None or not (self.blobs / hex_id).is_file():
            raise ImageError(f"{image_id}: no such image in the store")
        return self._image(record)

    def find(self, ref: IdRef | NameRef) -> StoredImage:
        return self._image(self.find_record(ref))

    def find_record(self, ref: IdRef | NameRef) -> ImageRecord:
        if isinstance(ref, IdRef):
            matches = [r for r in self.list_records() if r.hex.startswith(ref.hex_prefix)]
            shown = f"sha512-{ref.hex_prefix}"
            if len(matches) > 1:
                raise ImageError(f"{shown}: ambiguous image ID prefix ({len(matches)} images match; give more digits)")
        else:
            matches = [r for r in self.list_records() if r.name == ref.name and _labels_match(ref.labels, r.labels)]
            shown = str(ref)
        if not matches:
            raise ImageError(f"{shown}: no such image in the store (`kvmpod image list` shows what is there)")
        return matches[-1]  # several versions match a name: the newest import wins, as in rkt

    def find_text(self, text: str) -> ImageRecord:
        """An image named on the command line of `image rm/export/cat-manifest`: an ID or a store name."""
        ref = parse_image_ref(text)
        if not isinstance(ref, (IdRef, NameRef)):
            raise ImageError(f"{text}: give an image ID (sha512-…) or a store name, not a file or source")
        return self.find_record(ref)

    # --- removal ----------------------------------------------------------------------------

    @contextmanager
    def maintenance(self, shared: bool = False) -> Iterator[None]:
        """`locks/maintenance.lock`: exclusive while `image rm` or `image gc` works, shared while `image fsck`
        checks, which so never sees an image half removed (its record gone, its stamps not yet)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with (locks.shared if shared else locks.exclusive)(self.lock_file(MAINTENANCE_KEY)):
            yield

    def remove(self, record: ImageRecord) -> None:
        """Remove an image and its rootfs disks; refused while a pod uses it."""
        with self.maintenance():
            with locks.try_exclusive(self.use_file(record.hex)) as free:
                if not free:
                    raise ImageError(f"{record.id}: in use by a running pod")
                with locks.exclusive(self.lock_file(record.hex)):
                    (self.records / f"{record.hex}.json").unlink(missing_ok=True)
                    (self.blobs / record.hex).unlink(missing_ok=True)
                    (self.disks / f"{record.hex}.iso").unlink(missing_ok=True)
            self._gc()  # disks assembled with this image as a dependency, its stamps

    def gc(self) -> list[str]:
        """Remove what no image references: blobs without a record (a crash between the two writes),
        rootfs disks of removed images or of dependency sets that no longer resolve so, stale source
        stamps, temp files of dead processes, lock files of removed images. Returns what was removed."""
        with self.maintenance():
            return self._gc()

    def _gc(self) -> list[str]:
        removed: list[str] = []
        for d in (self.records, self.disks, self.sources):   # write_atomically's and the disk writer's temp files
            for temp in _listdir(d):
                if abandoned_temp(temp):   # never one still being written: a disk being built, say
                    temp.unlink(missing_ok=True)
                    removed.append(f"partial write {temp.name}")
        records = {r.hex: r for r in self.list_records()}
        live_disks: set[str] = set()
        for record in records.values():
            try:
                image = self._image(record)
                live_disks.add(disk_key(image, resolve_chain(self.find, image)))
            except ImageError:
                pass  # a dependency is missing: its old disk (if any) is no longer valid either
        for blob in _listdir(self.blobs):
            if blob.name not in records:
                with locks.try_exclusive(self.lock_file(blob.name)) as free:
                    if free and not (self.records / f"{blob.name}.json").exists():
                        blob.unlink(missing_ok=True)
                        removed.append(f"blob sha512-{blob.name}")
        for disk in _listdir(self.disks):
            key = disk.name.removesuffix(".iso")
            if key not in live_disks and abandoned_temp(disk) is None:
                with locks.try_exclusive(self.use_file(key)) as free:
                    if free:
                        disk.unlink(missing_ok=True)
                        removed.append(f"rootfs disk {disk.name}")
        for stamp_file in _listdir(self.sources):
            stamp = index.read_stamp(stamp_file)
            if abandoned_temp(stamp_file) is not None:
                continue
            if stamp is None or stamp.image_id.removeprefix("sha512-") not in records:
                stamp_file.unlink(missing_ok=True)
        for tmp in _listdir(self.tmp):
            m = _TMP_NAME.match(tmp.name)
            if m is None or not pid_alive(int(m.group("pid"))):
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
                removed.append(f"temporary file {tmp.name}")
        if self.layer_cache.dir.is_dir():
            with locks.try_exclusive(self.use_file(LAYERS_LOCK_KEY)) as no_pull:
                if no_pull:  # else a pull is running: its blobs are not referenced yet
                    removed += self.layer_cache.sweep(records.values())
        for lock in _listdir(self.locks):
            key = lock.name.rsplit(".", 1)[0]
            if key not in records and key not in live_disks and key not in (LAYERS_LOCK_KEY, MAINTENANCE_KEY):
                with locks.try_exclusive(lock) as free:
                    if free:
                        lock.unlink(missing_ok=True)
        return removed

    # --- export and disks -------------------------------------------------------------------------

    def export(self, record: ImageRecord, out: Path, overwrite: bool = False) -> None:
        """Write the image as an uncompressed ACI whose sha512 is its ID (so it re-imports to the same ID)."""
        if out.exists() and not overwrite:
            raise ImageError(f"{out}: already exists (use --overwrite)")
        if not out.resolve().parent.is_dir():
            raise ImageError(f"{out}: output directory does not exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
        try:
            with os.fdopen(fd, "wb") as dest, (self.blobs / record.hex).open("rb") as src:
                shutil.copyfileobj(src, dest, 1 << 20)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except FileNotFoundError as e:
            os.unlink(tmp)
            raise ImageError(f"{record.id}: removed from the store while exporting") from e
        except BaseException:
            os.unlink(tmp)
            raise

    def rootfs_disk(self, image: StoredImage) -> Path:
        """The image's rootfs disk (its dependencies laid down first), built once under a lock; later
        calls (any process) reuse it."""
        checked = self._take_checked(image.id)
        try:
            chain = resolve_chain(lambda ref: self._admitted_dependency(image, ref), image)
            key = disk_key(image, chain)
            disk = self.disks / f"{key}.iso"
            if disk.exists():
                return disk
            self.disks.mkdir(parents=True, exist_ok=True)
            self.locks.mkdir(parents=True, exist_ok=True)
            with locks.exclusive(self.lock_file(key)):
                if not disk.exists():  # else another process built it while we waited
                    build_rootfs_disk(image, chain, disk, checked)
            return disk
        finally:
            if checked is not None:
                checked.close()

    def claim(self, images: list[StoredImage]) -> locks.SharedLocks:
        """Shared locks that keep `image rm`/`gc` away from these images (and their disks) while held."""
        self._ensure_dirs()
        held = locks.SharedLocks()
        try:
            for image in images:
                chain = resolve_chain(self.find, image)
                for layer in chain:
                    held.add(self.use_file(layer.hex))
                held.add(self.use_file(disk_key(image, chain)))
                if not (self.blobs / image.hex).is_file():
                    raise ImageError(f"{image.id}: removed from the store while the pod was starting")
        except BaseException:
            held.close()
            raise
        return held


class _HashingWriter:
    """The output of a conversion: hashed as written (the image ID), capped like any import."""

    def __init__(self, raw: BinaryIO, digest: "hashlib._Hash", max_size: int, shown: str):
        self.raw, self.digest, self.max_size, self.shown, self.size = raw, digest, max_size, shown, 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.max_size:
            raise ImageError(f"{self.shown}: converted image exceeds the {human_size(self.max_size)} limit; "
                             "if it is genuine, raise [image] max-size in kvmpod.toml")
        self.digest.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _signature_rank(status: str) -> int:
    """How much a signature status says: a verified signature beats an unverified one beats none."""
    return 2 if status.startswith("verified") else 1 if status == UNVERIFIED else 0


def _labels_match(wanted: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


def _listdir(d: Path) -> list[Path]:
    try:
        return sorted(d.iterdir())
    except FileNotFoundError:
        return []
