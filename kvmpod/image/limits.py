"""Caps on what an image may unpack to: a small hostile archive must not fill the disk (a tar bomb).

Set in kvmpod.toml (docs/store.md):

    [image]
    max-size = "16G"       # uncompressed bytes of one image (or of one converted Docker/OCI image)
    max-entries = 1000000  # tar members of one image

The defaults fit the largest images people really run (CUDA and ML images are 10-15 GB unpacked)
while stopping a 10 MB gzip of zeros long before it fills a disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmpod.config import int_setting, size_setting

DEFAULT_MAX_SIZE = 16 << 30
DEFAULT_MAX_ENTRIES = 1_000_000


@dataclass(frozen=True)
class ImportLimits:
    max_size: int = DEFAULT_MAX_SIZE        # uncompressed bytes
    max_entries: int = DEFAULT_MAX_ENTRIES  # archive members

    @classmethod
    def from_config(cls) -> ImportLimits:
        return cls(max_size=size_setting("max-size", "image", DEFAULT_MAX_SIZE),
                   max_entries=int_setting("max-entries", "image", DEFAULT_MAX_ENTRIES))


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB': sizes in messages and listings."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
