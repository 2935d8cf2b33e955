"""Where the bytes of a Docker/OCI image are, and checking that they are the right ones.

An `Archive` maps the relative names of an image archive (a tar, read in place) or of an image
layout directory to byte ranges of open files. Nothing is extracted: a member of an uncompressed
tar is read at its offset; only a compressed outer archive or a compressed layer is decompressed,
into an anonymous temporary file (tempfile.TemporaryFile has no name in the directory, so it
vanishes with its descriptor: nothing is left behind, whatever happens).

A blob is checked against the digest (and size) its descriptor gives before it is parsed; a layer
also against its diff_id (the digest of the uncompressed tar, from the config) before its tar is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import stat
import tarfile
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from kvmpod.errors import ImageError
from kvmpod.image.archive import (compression_of, decompress_to, decompressing_reader, decompression_errors,
                                  detect_compression)
from kvmpod.image.limits import ImportLimits, human_size
from kvmpod.progress import Advance

DIGEST = re.compile(r"^(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")
MAX_JSON_BYTES = 4 << 20  # index, manifests and configs are a few KiB
_CHUNK = 1 << 20
_BUFFER = 64 << 10  # tarfile seeks to every header: a bigger buffer would re-read more per member
_MAX_SYMLINK_HOPS = 8


def member_name(name: Any, shown: str) -> str:
    """A name inside an archive or layout, normalised ("./a//b" -> "a/b"); escaping names are refused."""
    if not isinstance(name, str) or not name:
        raise ImageError(f"{shown}: {json.dumps(name)} is not a file name")
    if name.startswith("/") or "\x00" in name or ".." in name.split("/"):
        raise ImageError(f"{shown}: {json.dumps(name)} points outside the archive")
    normal = "/".join(p for p in name.split("/") if p and p != ".")
    if not normal:
        raise ImageError(f"{shown}: {json.dumps(name)} is not a file name")
    return normal


def blob_name(digest: Any, shown: str) -> str:
    """The layout path `blobs/<algorithm>/<hex>` of a descriptor digest; any other digest is refused."""
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise ImageError(f"{shown}: digest {json.dumps(digest)} is not sha256:<64 hex> or sha512:<128 hex>")
    algorithm, _, hex_ = digest.partition(":")
    return f"blobs/{algorithm}/{hex_}"


@dataclass(frozen=True)
class Span:
    """`size` bytes at `offset` of the open file `fd` (owned by the Archive)."""

    fd: int
    offset: int
    size: int

    def open(self) -> io.BufferedReader:
        return io.BufferedReader(_Window(self), _BUFFER)


class _Window(io.RawIOBase):
    """A seekable read-only view of a Span; pread keeps views of one file independent."""

    def __init__(self, span: Span):
        self._span, self._pos = span, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._span.size}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._span.size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._span.fd, n, self._span.offset + self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


class Archive:
    """The files of an image archive (a tar) or an image layout directory, by normalised name."""

    def __init__(self, shown: str, stack: ExitStack, root: Path | None = None):
        self.shown = shown  # the path as the user gave it: every error starts with it
        self._stack = stack
        self._root = root  # a layout directory; None for a tar
        self._spans: dict[str, Span] = {}
        self._links: dict[str, str] = {}  # tar symlinks and hard links: name -> target name
        self._bad: dict[str, str] = {}  # names that cannot be read, and why

    @classmethod
    def from_tar(cls, path: Path, tmp_dir: Path, stack: ExitStack, limits: ImportLimits,
                 advance: Advance) -> Archive:
        archive = cls(str(path), stack)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"{path}: cannot open: {e.strerror}") from e
        stack.callback(os.close, fd)
        if detect_compression(path) != "none":  # `docker save | gzip`: decompress once, then read in place
            tmp = stack.enter_context(tempfile.TemporaryFile(dir=tmp_dir))
            decompress_to(path, tmp, limits, advance)
            fd = tmp.fileno()
        archive._index_tar(Span(fd, 0, os.fstat(fd).st_size), limits)
        return archive

    @classmethod
    def from_dir(cls, path: Path, stack: ExitStack, shown: str | None = None) -> Archive:
        if not path.is_dir():
            raise ImageError(f"{path}: no such directory (an oci: image is an OCI image layout directory)")
        return cls(shown or str(path), stack, root=path)

    def _index_tar(self, whole: Span, limits: ImportLimits) -> None:
        try:
            with tarfile.open(fileobj=whole.open(), mode="r:") as tar:
                for count, m in enumerate(tar, 1):
                    if count > limits.max_entries:
                        raise ImageError(f"{self.shown}: more than {limits.max_entries} members")
                    if all(p in ("", ".") for p in m.name.split("/")):
                        continue  # "./", the archive's top directory
                    name = member_name(m.name, self.shown)
                    if m.isdir():
                        continue  # only files are looked up
                    if name in self._spans or name in self._links:
                        self._bad[name] = "the archive holds it more than once"
                    elif m.issym() or m.islnk():
                        target = posixpath.join(posixpath.dirname(name), m.linkname) if m.issym() else m.linkname
                        self._links[name] = target
                    elif m.isreg() and not m.issparse():
                        self._spans[name] = Span(whole.fd, m.offset_data, m.size)
                    else:
                        self._bad[name] = "not a regular file"
        except tarfile.TarError as e:
            raise ImageError(f"{self.shown}: not a valid tar archive: {e}") from e

    def find(self, name: str) -> Span | None:
        """The bytes of `name` (a normalised name), None if there is no such file."""
        if self._root is not None:
            return self._open_file(name)
        for _ in range(_MAX_SYMLINK_HOPS):
            if name in self._bad:
                raise ImageError(f"{self.shown}: {name}: {self._bad[name]}")
            target = self._links.get(name)
            if target is None:
                return self._spans.get(name)
            name = member_name(posixpath.normpath(target), f"{self.shown}: {name}")
        raise ImageError(f"{self.shown}: {name}: too many levels of links")

    def span(self, name: str, missing: str = "") -> Span:
        found = self.find(name)
        if found is None:
            what = "no such file" if self._root is not None else "no such member"
            raise ImageError(f"{self.shown}: {name}: {what}{f' ({missing})' if missing else ''}")
        return found

    def _open_file(self, name: str) -> Span | None:
        assert self._root is not None
        try:
            # O_NONBLOCK: a FIFO planted in the layout must not hang the open.
            fd = os.open(self._root / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ImageError(f"{self.shown}: {name}: cannot open: {e.strerror}") from e
        self._stack.callback(os.close, fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{self.shown}: {name}: not a regular file")
        return Span(fd, 0, st.st_size)

    # -- checked reads ---------------------------------------------------------------------------

    def read_json(self, name: str, *, digest: str | None = None, size: int | None = None,
                  missing: str = "") -> Any:
        """The JSON document `name`, checked against `digest` and `size` when given."""
        span = self.span(name, missing)
        _check_size(self.shown, name, span.size, size)
        if span.size > MAX_JSON_BYTES:
            raise ImageError(f"{self.shown}: {name}: {human_size(span.size)} is too big for a JSON document "
                             f"(limit {human_size(MAX_JSON_BYTES)})")
        with span.open() as f:
            data = f.read()
        if digest is not None:
            _check_digest(self.shown, name, digest, _hexdigest(digest, data))
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImageError(f"{self.shown}: {name}: not valid JSON: {e}") from e
        except RecursionError as cause:
            raise ImageError(f"{self.shown}: {name}: JSON nested too deeply") from cause

    def digest_of(self, name: str) -> str:
        """The sha256 digest of a file, for naming one that no descriptor names."""
        with self.span(name).open() as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _hexdigest(digest: str, data: bytes) -> str:
    return hashlib.new(digest.partition(":")[0], data).hexdigest()


def _check_size(shown: str, name: str, actual: int, expected: int | None) -> None:
    if expected is not None and actual != expected:
        raise ImageError(f"{shown}: {name}: size mismatch: {actual} bytes, the descriptor says {expected}")


def _check_digest(shown: str, name: str, expected: str, actual_hex: str) -> None:
    if expected.partition(":")[2] != actual_hex:
        raise ImageError(f"{shown}: {name}: digest mismatch (expected {expected}, "
                         f"got {expected.partition(':')[0]}:{actual_hex})")


class Budget:
    """How many more uncompressed layer bytes the conversion may unpack (ImportLimits.max_size)."""

    def __init__(self, shown: str, limit: int):
        self._shown, self._limit, self._left = shown, limit, limit

    def spend(self, n: int) -> None:
        self._left -= n
        if self._left < 0:
            raise ImageError(f"{self._shown}: uncompressed layers exceed the {human_size(self._limit)} limit "
                             "(a tar bomb?); if it is genuine, raise [image] max-size in kvmpod.toml")


@dataclass(frozen=True)
class LayerBlob:
    name: str  # its name in the archive or layout
    digest: str | None  # of the blob as stored, when a descriptor (or a blobs/ name) gives it
    diff_id: str  # of the uncompressed tar: the config's rootfs.diff_ids entry
    size: int | None = None  # from the descriptor


def open_layer(archive: Archive, layer: LayerBlob, *, tmp_dir: Path, stack: ExitStack, budget: Budget,
               advance: Advance) -> tuple[BinaryIO, int]:
    """The layer's uncompressed tar (seekable) and its size, after checking both of its digests.

    A blob with a known digest is checked before any of it reaches a decompressor or a tar parser.
    """
    span = archive.span(layer.name, "the image manifest names it")
    _check_size(archive.shown, layer.name, span.size, layer.size)
    with span.open() as f:
        kind = compression_of(f.read(6))
    stored = _Digests(layer.digest, layer.diff_id if kind == "none" else None)
    if kind == "none" or layer.digest is not None:
        with span.open() as f:
            while chunk := f.read(_CHUNK):
                stored.update(chunk)
                advance(len(chunk))
        if layer.digest is not None:
            _check_digest(archive.shown, layer.name, layer.digest, stored.hexdigest(layer.digest))
        advance = _ignore  # counted once
    if kind == "none":
        budget.spend(span.size)
        _check_diff_id(archive.shown, layer, stored)
        return span.open(), span.size
    tmp = stack.enter_context(tempfile.TemporaryFile(dir=tmp_dir))
    uncompressed = _Digests(layer.diff_id)
    size = 0
    try:
        with span.open() as raw, _decompressor(kind, cast(BinaryIO, _Counting(raw, advance)), archive.shown, layer.name) as stream:
            while chunk := stream.read(_CHUNK):
                budget.spend(len(chunk))
                size += len(chunk)
                uncompressed.update(chunk)
                tmp.write(chunk)
    except decompression_errors() as e:
        raise ImageError(f"{archive.shown}: {layer.name}: corrupt or truncated {kind} stream: {e}") from e
    _check_diff_id(archive.shown, layer, uncompressed)
    tmp.seek(0)
    return tmp, size


def _check_diff_id(shown: str, layer: LayerBlob, digests: _Digests) -> None:
    if digests.hexdigest(layer.diff_id) != layer.diff_id.partition(":")[2]:
        raise ImageError(f"{shown}: {layer.name}: the uncompressed layer does not match the config's "
                         f"diff_id {layer.diff_id}")


def _ignore(_: int) -> None:
    pass




def _decompressor(kind: str, source: BinaryIO, shown: str, name: str) -> BinaryIO:
    # zstd reads across frames: zstd:chunked and other multi-frame layers are one tar in many frames.
    return decompressing_reader(kind, source, f"{shown}: {name}")


class _Digests:
    """The running digests that a blob's expected digests need (sha256 and/or sha512)."""

    def __init__(self, *expected: str | None):
        algorithms = sorted({d.partition(":")[0] for d in expected if d})
        self._running = {algo: hashlib.new(algo) for algo in algorithms}

    def update(self, data: bytes) -> None:
        for h in self._running.values():
            h.update(data)

    def hexdigest(self, digest: str) -> str:
        return self._running[digest.partition(":")[0]].hexdigest()


class _Counting:
    """Tells the progress what a decompressor reads."""

    def __init__(self, raw: BinaryIO, advance: Advance):
        self._raw, self._advance = raw, advance

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._advance(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # what ISA-L's gzip reader calls
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]  # typing.BinaryIO omits readinto
        self._advance(n or 0)
        return n
