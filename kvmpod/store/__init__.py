"""The image store (docs/store.md): images by ID and name, their rootfs disks, locks for concurrency."""

from kvmpod.store.store import Store
from kvmpod.store.stored import StoredImage

__all__ = ["Store", "StoredImage"]
