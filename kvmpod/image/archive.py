"""Opening image archives: compression is detected by magic bytes, never by the file name."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
from pathlib import Path
from typing import BinaryIO

from kvmpod.errors import ImageError

_MAGICS: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
]

COPY_CHUNK = 1 << 20


def detect_compression(path: Path) -> str:
    """Return "gzip", "bzip2", "xz", "zstd" or "none"."""
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError as e:
        raise ImageError(f"{path}: cannot read image: {e.strerror}") from None
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    return "none"


def open_decompressed(path: Path) -> BinaryIO:
    """A stream of the uncompressed tar inside `path`."""
    kind = detect_compression(path)
    if kind == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if kind == "bzip2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if kind == "xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    if kind == "zstd":
        try:
            import zstandard  # optional: the spec's compressions are gzip, bzip2 and xz
        except ImportError:
            raise ImageError(f"{path}: zstd-compressed image needs the Python 'zstandard' package") from None
        return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)  # type: ignore[return-value]
    return path.open("rb")


def decompress_to(path: Path, dest: BinaryIO) -> str:
    """Copy the uncompressed tar of `path` into `dest`; return its image ID (sha512 of the uncompressed tar)."""
    digest = hashlib.sha512()
    try:
        with open_decompressed(path) as src:
            while chunk := src.read(COPY_CHUNK):
                digest.update(chunk)
                dest.write(chunk)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated compressed stream: {e}") from None
    return "sha512-" + digest.hexdigest()

