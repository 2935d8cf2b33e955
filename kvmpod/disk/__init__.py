"""The rootfs disk: an image's rootfs packed into a read-only ISO 9660 + Rock Ridge disk image.

`entries_from_tar` / `entries_from_dir` turn an ACI's rootfs into a safe, validated stream of
`RootfsEntry` records (no extraction, no root needed); `build_iso` writes them into an ISO that the
guest mounts with Linux's isofs. See docs/disk.md for the format and the decisions behind it.
"""

from __future__ import annotations

from kvmpod.disk.entries import (
    MAX_FILE_SIZE,
    ROOT_PATH,
    EntryKind,
    RootfsEntry,
    entries_from_dir,
    entries_from_tar,
)
from kvmpod.disk.iso import MAX_NAME_BYTES, MAX_SYMLINK_TARGET_BYTES, IsoStats, build_iso

__all__ = [
    "MAX_FILE_SIZE",
    "MAX_NAME_BYTES",
    "MAX_SYMLINK_TARGET_BYTES",
    "ROOT_PATH",
    "EntryKind",
    "IsoStats",
    "RootfsEntry",
    "build_iso",
    "entries_from_dir",
    "entries_from_tar",
]
