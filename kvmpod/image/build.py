"""`kvmpod image build`: pack a directory tree and a manifest into a spec-valid ACI (like appc's actool).

The tree is read with the same rules as an imported rootfs (kvmpod/disk/entries.py) and written by
the same deterministic writer as converted images (kvmpod/image/layers.py): owners are numeric,
nothing comes from the clock, so building the same tree twice gives the same image ID.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from kvmpod.errors import ImageError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from kvmpod.disk.entries import RootfsEntry

COMPRESSIONS = ("gzip", "none", "bzip2", "xz")


def _compressor(kind: str, raw: BinaryIO) -> BinaryIO:
    # The compressed files are binary streams, which typeshed does not derive from typing.BinaryIO:
    # hence the ignores.
    if kind == "gzip":
        # no name, no time in the header
        return gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)  # type: ignore[return-value]
    if kind == "bzip2":
        return bz2.BZ2File(raw, "wb")  # type: ignore[return-value]
    if kind == "xz":
        return lzma.LZMAFile(raw, "wb")  # type: ignore[return-value]
    return raw


def _whole_seconds(entries: Iterable[RootfsEntry]) -> Iterator[RootfsEntry]:
    """Mtimes to whole seconds, as actool (Go's tar) writes them: a sub-second mtime costs every
    member an extra PAX header, doubling what each import and disk build parses, and the rootfs
    disk keeps whole seconds anyway."""
    for e in entries:
        yield e if e.mtime == int(e.mtime) else dataclasses.replace(e, mtime=int(e.mtime))


def build_aci(rootfs: Path, manifest: dict, out: Path, compression: str = "gzip") -> None:
    """Write `out` atomically: a tar holding `manifest` then `rootfs/` with owners, modes and links kept."""
    # The rootfs reader and tar writer (tarfile) only here: kvmpod/cli/images.py imports this module
    # for every image command.
    from kvmpod.disk.entries import entries_from_dir
    from kvmpod.image.layers import write_aci

    if not rootfs.is_dir() or rootfs.is_symlink():
        raise ImageError(f"{rootfs}: rootfs is not a directory")
    if compression not in COMPRESSIONS:
        raise ImageError(f"unknown compression {compression!r} (choose one of {', '.join(COMPRESSIONS)})")
    out_dir = out.resolve().parent
    if not out_dir.is_dir():
        raise ImageError(f"{out}: output directory does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as raw:
            with ExitStack() as stack:
                stream = _compressor(compression, raw)
                if stream is not raw:
                    stack.enter_context(stream)
                write_aci(_whole_seconds(entries_from_dir(rootfs)), manifest, stream)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out)
    except BaseException:
        os.unlink(tmp_name)
        raise
