"""An image as the store hands it out: its ID, its blob and its validated manifest.

Its own module so that what works on stored images (rootfs assembly, kvmpod/store/rootfs.py) needs
nothing of the Store itself: store.py imports rootfs.py, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmpod.image.manifest import ImageManifest
from kvmpod.store.index import SIGNATURE_UNSIGNED


@dataclass(frozen=True)
class StoredImage:
    id: str                 # "sha512-<128 hex>"
    blob: Path              # uncompressed tar
    manifest: ImageManifest
    signature: str = SIGNATURE_UNSIGNED     # the index record's signature status

    @property
    def hex(self) -> str:
        return self.id.removeprefix("sha512-")
