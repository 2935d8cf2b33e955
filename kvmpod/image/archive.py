"""Opening image archives: compression is detected by magic bytes, never by the file name."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import queue
import sys
import threading
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
        raise ImageError(f"{path}: cannot read image: {e.strerror}") from e
    return compression_of(head)


def decompression_errors() -> tuple[type[Exception], ...]:
    """What a corrupt or truncated compressed stream raises, zstandard's error included once it is loaded."""
    errors: tuple[type[Exception], ...] = (OSError, EOFError, lzma.LZMAError, ValueError)
    if zstd := sys.modules.get("zstandard"):
        errors += (zstd.ZstdError,)
    if isal_zlib := sys.modules.get("isal.isal_zlib"):
        errors += (isal_zlib.error,)  # not an OSError: what ISA-L's inflate raises on a bad block
    return errors


class _CountingReader(io.RawIOBase):
    """Reports how many compressed bytes have been read (the progress of a decompression)."""

    def __init__(self, raw: BinaryIO, advance: Advance):
        self.raw, self.advance = raw, advance

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]  # typing.BinaryIO omits readinto; files have it
        self.advance(n or 0)
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """zstd frames decompressed one after another; unlike zstandard's stream_reader, a stream that
    ends inside a frame is an error (ValueError, reported as a truncated stream), not a short read.

    Input is fed in small pieces because one call decompresses all it is given: at zstd's worst
    ratio (an RLE block: 4 bytes for 128 KiB) a 2 KiB piece yields at most 64 MiB, so a hostile
    stream cannot balloon memory before the size cap sees the bytes."""

    FEED = 2048

    def __init__(self, raw: BinaryIO, zstandard):
        self.raw, self.zstandard = raw, zstandard
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.pending = memoryview(b"")
        self.in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            piece = self.raw.read(self.FEED)
            if not piece:
                if self.in_frame:
                    raise ValueError("the zstd stream ends inside a frame")
                return 0
            out = b""
            while piece:
                self.in_frame = True
                out += self.dobj.decompress(piece)
                piece = b""
                if self.dobj.eof:  # a frame ended; what follows is the next frame
                    piece = self.dobj.unused_data
                    self.dobj = self.zstandard.ZstdDecompressor().decompressobj()
                    self.in_frame = False
            self.pending = memoryview(out)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


class _OwningReader(io.RawIOBase):
    """A decompressing reader that also closes the file under it (GzipFile(fileobj=) does not)."""

    def __init__(self, reader: BinaryIO, raw: BinaryIO):
        self.reader, self.raw = reader, raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.reader.readinto(buffer)  # type: ignore[attr-defined]  # as in _CountingReader

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.raw.close()
            super().close()


def _gzip_reader(raw: BinaryIO) -> BinaryIO:
    """gzip through ISA-L's inflate (the `isal` package: about 3x zlib's speed on x86-64, the same
    stream semantics: multi-member files, CRC and length checked, EOFError on a cut stream), else zlib."""
    try:
        from isal import igzip  # lazy: only an import of gzip data pays for loading it
    except ImportError:  # kvmpod installed without its dependencies: zlib reads the same streams
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return igzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]


def decompressing_reader(kind: str, raw: BinaryIO, shown: str) -> BinaryIO:
    """A reader of `raw` decompressed as `kind` (a compression_of() result); `shown` names it in errors."""
    # The decompressing files are binary streams, which typeshed does not derive from typing.BinaryIO:
    # hence the ignores (here and for _OwningReader below).
    if kind == "gzip":
        return _gzip_reader(raw)
    if kind == "bzip2":
        return bz2.BZ2File(raw, "rb")  # type: ignore[return-value]
    if kind == "xz":
        return lzma.LZMAFile(raw, "rb")  # type: ignore[return-value]
    if kind == "zstd":
        try:
            import zstandard  # optional: the spec's compressions are gzip, bzip2 and xz
        except ImportError as e:
            raise ImageError(f"{shown}: zstd-compressed data needs the Python 'zstandard' package") from e
        return io.BufferedReader(_ZstdReader(raw, zstandard), COPY_CHUNK)
    return raw


def open_decompressed(path: Path, advance: Advance | None = None) -> BinaryIO:
    """A stream of the uncompressed tar inside `path`; `advance` is told of each compressed byte read."""
    kind = detect_compression(path)
    raw: BinaryIO = path.open("rb")
    if advance is not None:
        raw = io.BufferedReader(_CountingReader(raw, advance), COPY_CHUNK)
    try:
        reader = decompressing_reader(kind, raw, str(path))
    except BaseException:
        raw.close()
        raise
    return raw if reader is raw else _OwningReader(reader, raw)  # type: ignore[return-value]


def decompress_to(path: Path, dest: BinaryIO, limits: ImportLimits | None = None,
                  advance: Advance | None = None) -> str:
    """Copy the uncompressed tar of `path` into `dest`; return its image ID (sha512 of the uncompressed tar).

    Stops with an ImageError as soon as the uncompressed size passes `limits.max_size` (a tar bomb).
    Inflating (this thread) overlaps with hashing and writing (_HashingWriter's thread): all three
    release the GIL on big buffers, so on two CPUs the import takes about the longest of them."""
    max_size = (limits or ImportLimits()).max_size
    written = 0
    sink = _HashingWriter(dest, path)
    try:
        with open_decompressed(path, advance) as src:
            while chunk := src.read(COPY_CHUNK):
                written += len(chunk)
                if written > max_size:
                    raise ImageError(
                        f"{path}: uncompressed image exceeds the {human_size(max_size)} limit (a tar bomb?); "
                        "if it is genuine, raise [image] max-size in kvmpod.toml")
                sink.put(chunk)
    except decompression_errors() as e:
        sink.abandon()
        raise ImageError(f"{path}: corrupt or truncated compressed stream: {e}") from e
    except BaseException:
        sink.abandon()
        raise
    return "sha512-" + sink.finish()


class _HashingWriter:
    """sha512 and write of decompressed chunks in a thread of its own, a few chunks behind the reader.

    A write error (the store's filesystem full or read-only: not the image's fault) is kept and raised
    as an ImageError by the next put() or by finish(); after one, chunks are drained unwritten so that
    the reader never blocks on a full queue."""

    DEPTH = 4  # chunks in flight: bounds the memory (4 MiB) and keeps both threads busy

    def __init__(self, dest: BinaryIO, path: Path):
        self.dest, self.path = dest, path
        self.digest = hashlib.sha512()
        self.queue: queue.Queue[bytes | None] = queue.Queue(self.DEPTH)
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name="kvmpod-import-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunk := self.queue.get()) is not None:
            if self.error is None:
                self.digest.update(chunk)
                try:
                    self.dest.write(chunk)
                except OSError as e:
                    self.error = e

    def put(self, chunk: bytes) -> None:
        self._raise()
        self.queue.put(chunk)

    def finish(self) -> str:
        """Wait for every chunk to be hashed and written; the hex digest."""
        self.abandon()
        self._raise()
        return self.digest.hexdigest()

    def abandon(self) -> None:
        """Stop the thread (after the chunks already queued); safe to call twice."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if (e := self.error) is not None:
            where = Path(str(getattr(self.dest, "name", ""))).parent
            raise ImageError(f"{self.path}: cannot import it into {where}: {e.strerror or e}") from e
