"""The store's cache of blobs pulled from registries: `<store>/layers/<alg>/<hex>` (docs/store.md).

A `docker://` pull keeps the blobs of the image it converted here, content-addressed by their
registry digest: the linux/amd64 image manifest, the config and the (compressed) layers exactly as
served. A later pull links what it finds here into its OCI layout instead of downloading it, so a
second pull of the same image asks the registry for the manifest and nothing else, and images that
share a base share its layers.

Blobs enter only once their image is stored (a failed pull leaves nothing here). They stay while an
image pulled from them is in the store: an image record whose source is `docker://…` names its
manifest by the converter's `appc.io/docker/manifesthash` annotation, the manifest names the rest.
`image rm` of the last such image and `image gc` remove the others — not while a pull is running:
pulls hold `locks/layers.use` shared, gc takes it exclusively without waiting and skips the cache
when it cannot.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from kvmpod.store.index import ImageRecord

MANIFEST_ANNOTATION = "appc.io/docker/manifesthash"
LOCK_KEY = "layers"   # locks/layers.use
DIGEST = re.compile(r"^(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")  # as kvmpod/image/oci/blobs.py


class LayerCache:
    def __init__(self, store_root: Path):
        self.dir = store_root / "layers"

    def path(self, digest: str) -> Path:
        algorithm, _, hex_ = digest.partition(":")
        return self.dir / algorithm / hex_

    def find(self, digest: str) -> Path | None:
        """The cached blob with this digest, if there is one."""
        if not DIGEST.match(digest):
            return None
        path = self.path(digest)
        return path if path.is_file() else None

    def adopt(self, layout: Path, digests: Iterable[str]) -> None:
        """Hard-link the blobs of a stored image's layout into the cache (those it lacks)."""
        for digest in digests:
            algorithm, _, hex_ = digest.partition(":")
            dest = self.path(digest)
            if dest.is_file():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(layout / "blobs" / algorithm / hex_, dest)
            except FileExistsError:
                pass  # another pull of the same blob got there first: the same bytes

    def referenced(self, records: Iterable[ImageRecord]) -> set[str]:
        """The digests the stored images pulled from a registry need: manifest, config, layers."""
        live: set[str] = set()
        for record in records:
            if not record.source.startswith("docker://"):
                continue
            annotations = record.manifest.get("annotations") or []
            manifest = next((a.get("value") for a in annotations if isinstance(a, dict)
                             and a.get("name") == MANIFEST_ANNOTATION), None)
            if not isinstance(manifest, str) or not DIGEST.match(manifest):
                continue
            live.add(manifest)
            try:
                document = json.loads(self.path(manifest).read_bytes())
                descriptors = [document["config"], *document["layers"]]
                live.update(d["digest"] for d in descriptors if isinstance(d.get("digest"), str))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # not cached (pulled before the cache existed, or removed): nothing to keep
        return live

    def sweep(self, records: Iterable[ImageRecord]) -> list[str]:
        """Remove the blobs no stored image needs (the caller holds locks/layers.use exclusively)."""
        live = self.referenced(records)
        removed = []
        for algorithm_dir in _listdir(self.dir):
            for blob in _listdir(algorithm_dir):
                if f"{algorithm_dir.name}:{blob.name}" not in live:
                    blob.unlink(missing_ok=True)
                    removed.append(f"pulled blob {algorithm_dir.name}:{blob.name}")
        return removed


def _listdir(d: Path) -> list[Path]:
    try:
        return sorted(d.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
