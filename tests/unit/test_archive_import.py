"""kvmpod.image.archive.decompress_to: inflating in one thread, hashing and writing in another
(_HashingWriter), with the same results and errors as one loop, and no thread left behind."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import random
import threading
from pathlib import Path

import pytest

from kvmpod.errors import ImageError
from kvmpod.image import archive
from kvmpod.image.limits import ImportLimits


def _payload(size: int) -> bytes:
    rng = random.Random(22)
    words = [rng.randbytes(rng.randrange(1, 64)) for _ in range(512)]  # compressible, not trivially
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kvmpod-import-writer"]


@pytest.fixture
def gz(tmp_path: Path) -> tuple[Path, bytes]:
    data = _payload(9 * archive.COPY_CHUNK + 12345)  # more chunks than the writer's queue holds
    path = tmp_path / "image.aci"
    path.write_bytes(gzip.compress(data, mtime=0) + gzip.compress(b"second member", mtime=0))
    return path, data + b"second member"


def test_the_id_and_the_bytes_are_those_of_the_uncompressed_stream(gz):
    path, data = gz
    out = io.BytesIO()
    assert archive.decompress_to(path, out) == "sha512-" + hashlib.sha512(data).hexdigest()
    assert out.getvalue() == data
    assert not _writer_threads()


def test_gzip_is_inflated_by_isal():
    reader = archive.decompressing_reader("gzip", io.BytesIO(gzip.compress(b"x")), "x")
    assert type(reader).__module__.startswith("isal.")
    assert reader.read() == b"x"


class _FullDisk(io.BytesIO):
    name = "/store/tmp/import-1.tar"

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def write(self, b) -> int:  # type: ignore[override]
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_a_write_error_is_the_store_s_fault_not_a_corrupt_image(gz):
    path, _ = gz
    with pytest.raises(ImageError, match=r"image\.aci: cannot import it into /store/tmp: No space left on device"):
        archive.decompress_to(path, _FullDisk(3 * archive.COPY_CHUNK))
    assert not _writer_threads()


def test_the_size_cap_and_a_corrupt_stream_stop_the_writer_too(gz, tmp_path):
    path, _ = gz
    with pytest.raises(ImageError, match="exceeds the 4.0 MiB limit"):
        archive.decompress_to(path, io.BytesIO(), ImportLimits(max_size=4 << 20))
    assert not _writer_threads()
    raw = path.read_bytes()
    cut = tmp_path / "cut.aci"
    cut.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated compressed stream"):
        archive.decompress_to(cut, io.BytesIO())
    assert not _writer_threads()
