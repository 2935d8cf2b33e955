"""`kvmpod image build`: pack a directory tree and a manifest into a spec-valid ACI (like appc's actool)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

from kvmpod.errors import ImageError

_MODES = {"none": "w", "gzip": "w:gz", "bzip2": "w:bz2", "xz": "w:xz"}


def build_aci(rootfs: Path, manifest: dict, out: Path, compression: str = "gzip") -> None:
    """Write `out` atomically: a tar holding `manifest` then `rootfs/` with owners, modes and links kept."""
    if not rootfs.is_dir() or rootfs.is_symlink():
        raise ImageError(f"{rootfs}: rootfs is not a directory")
    if compression not in _MODES:
        raise ImageError(f"unknown compression {compression!r} (choose one of {', '.join(_MODES)})")
    out_dir = out.resolve().parent
    if not out_dir.is_dir():
        raise ImageError(f"{out}: output directory does not exist")
    data = json.dumps(manifest, indent=2).encode() + b"\n"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode=_MODES[compression],  # type: ignore[call-overload]
                                                      format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("manifest")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
            tar.add(rootfs, arcname="rootfs", recursive=True)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out)
    except BaseException:
        os.unlink(tmp_name)
        raise
