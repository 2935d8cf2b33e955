"""Opening image archives: compression is detected by magic bytes, never by the file name."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import sys
from pathlib import Path
from typing import BinaryIO

from kvmpod.errors import ImageError
from kvmpod.image.limits import ImportLimits, human_size
from kvmpod.progress import Advance

_MAGICS: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
]

COPY_CHUNK = 1 << 20


def compression_of(head: bytes) -> str:
    """"gzip", "bzip2", "xz", "zstd" or "none", from the first bytes of a stream (at least 6)."""
    return next((name for magic, name in _MAGICS if head.startswith(magic)), "none")


def detect_compression(path: Path) -> str:
    """Return "gzip", "bzip2", "xz", "zstd" or "none"."""
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError as e:
        raise ImageError(f"{path}: cannot read image: {e.strerror}") from None
    return compression_of(head)


def decompression_errors() -> tuple[type[Exception], ...]:
    """What a corrupt or truncated compressed stream raises, zstandard's error included once it is loaded."""
    errors: tuple[type[Exception], ...] = (OSError, EOFError, lzma.LZMAError, ValueError)
    if zstd := sys.modules.get("zstandard"):
        errors += (zstd.ZstdError,)
    return errors


class _CountingReader(io.RawIOBase):
    """Reports how many compressed bytes have been read (the progress of a decompression)."""

    def __init__(self, raw: BinaryIO, advance: Advance):
        self.raw, self.advance = raw, advance

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        self.advance(n or 0)
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_decompressed(path: Path, advance: Advance | None = None) -> BinaryIO:
    """A stream of the uncompressed tar inside `path`; `advance` is told of each compressed byte read."""
    kind = detect_compression(path)
    raw: BinaryIO = path.open("rb")
    if advance is not None:
        raw = io.BufferedReader(_CountingReader(raw, advance), COPY_CHUNK)  # type: ignore[assignment]
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "bzip2":
        return bz2.BZ2File(raw, "rb")  # type: ignore[return-value]
    if kind == "xz":
        return lzma.LZMAFile(raw, "rb")  # type: ignore[return-value]
    if kind == "zstd":
        try:
            import zstandard  # optional: the spec's compressions are gzip, bzip2 and xz
        except ImportError:
            raw.close()
            raise ImageError(f"{path}: zstd-compressed image needs the Python 'zstandard' package") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)  # type: ignore[return-value]
    return raw


def decompress_to(path: Path, dest: BinaryIO, limits: ImportLimits | None = None,
                  advance: Advance | None = None) -> str:
    """Copy the uncompressed tar of `path` into `dest`; return its image ID (sha512 of the uncompressed tar).

    Stops with an ImageError as soon as the uncompressed size passes `limits.max_size` (a tar bomb)."""
    max_size = (limits or ImportLimits()).max_size
    digest = hashlib.sha512()
    written = 0
    try:
        with open_decompressed(path, advance) as src:
            while chunk := src.read(COPY_CHUNK):
                written += len(chunk)
                if written > max_size:
                    raise ImageError(
                        f"{path}: uncompressed image exceeds the {human_size(max_size)} limit (a tar bomb?); "
                        "if it is genuine, raise [image] max-size in kvmpod.toml")
                digest.update(chunk)
                dest.write(chunk)
    except decompression_errors() as e:
        raise ImageError(f"{path}: corrupt or truncated compressed stream: {e}") from None
    return "sha512-" + digest.hexdigest()
