"""What makes an uncompressed tar an ACI (spec/aci.md), checked in one pass over its headers.

Exactly one regular top-level `manifest` (at most MAX_MANIFEST_BYTES) and a `rootfs/` whose every
entry passes the rootfs rules (kvmpod/disk/entries.py: no escapes, nothing the disk cannot hold),
nothing else, the tar's end-of-archive marker present (a plain tar cut at a member boundary is not
silently a smaller image), and the caps of kvmpod.toml [image] on entries and total file bytes
(sparse members count their full size: that is what the disk would hold).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpod.errors import DiskError, ImageError, ManifestError, printable
from kvmpod.image.limits import ImportLimits, human_size
from kvmpod.image.manifest import MAX_MANIFEST_BYTES

if TYPE_CHECKING:
    import tarfile

    from kvmpod.disk.entries import RootfsEntry

BLOCK = 512

KEEP_ENTRIES = 100_000
"""check_aci_keeping keeps the entries of an archive with at most this many (about 1 KiB each)."""


@dataclass
class CheckedRootfs:
    """The rootfs entries check_aci_keeping validated, in archive order, for a disk build that follows
    the import in the same process (`kvmpod run FILE.aci`), so that it does not parse and check every
    header again. FILE openers read from `tar`, open on the checked file: renaming that file into
    the store keeps it the same file. The owner must close() it."""

    tar: tarfile.TarFile
    entries: list[RootfsEntry]

    def close(self) -> None:
        self.tar.close()


def check_aci(tar_path: Path, shown_as: str | Path, limits: ImportLimits) -> bytes:
    """Check the ACI tar at `tar_path` and return its manifest's bytes (not yet parsed)."""
    return _check(tar_path, shown_as, limits, keep=False)[0]


def check_aci_keeping(tar_path: Path, shown_as: str | Path,
                      limits: ImportLimits) -> tuple[bytes, CheckedRootfs | None]:
    """check_aci, and the checked entries (None for an archive of more than KEEP_ENTRIES)."""
    return _check(tar_path, shown_as, limits, keep=True)


def _check(tar_path: Path, shown_as: str | Path, limits: ImportLimits,
           keep: bool) -> tuple[bytes, CheckedRootfs | None]:
    import tarfile  # lazy, with the tar reader below: `kvmpod run` of a stored image never opens one

    from kvmpod.disk.entries import EntryKind, entries_from_tar

    manifests: list[tarfile.TarInfo] = []
    kept: list[RootfsEntry] | None = [] if keep else None
    entries = file_bytes = 0
    try:
        with ExitStack() as stack:
            tar = stack.enter_context(tarfile.open(tar_path, "r:"))
            for entry in entries_from_tar(tar, on_manifest=manifests.append):
                entries += 1
                if entries > limits.max_entries:
                    raise ImageError(f"more than {limits.max_entries} entries (a tar bomb?); if the image is "
                                     "genuine, raise [image] max-entries in kvmpod.toml")
                if entry.kind is EntryKind.FILE:
                    file_bytes += entry.size
                    if file_bytes > limits.max_size:
                        raise ImageError(f"{printable(entry.path)}: the files add up to more than the "
                                         f"{human_size(limits.max_size)} limit (sparse files count in full); "
                                         "if the image is genuine, raise [image] max-size in kvmpod.toml")
                if kept is not None:
                    if entries > KEEP_ENTRIES:
                        kept = None
                    else:
                        kept.append(entry)
            end = tar.offset
            if not manifests:
                raise ImageError("not an ACI: no top-level 'manifest' file")
            if entries == 0:
                raise ImageError("not an ACI: no 'rootfs/' directory")
            member = manifests[0]
            if member.size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest: {member.size} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
            f = tar.extractfile(member)
            assert f is not None
            data = f.read(member.size)
            _check_end_marker(tar_path, end)
            if kept is not None:
                stack.pop_all()   # the archive stays open for CheckedRootfs's openers; its owner closes it
                return data, CheckedRootfs(tar, kept)
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as e:
        raise ImageError(f"{shown_as}: not a valid tar archive: {printable(str(e))}") from e
    except ManifestError as e:
        raise ManifestError(f"{shown_as}: {e}") from e
    except (ImageError, DiskError) as e:  # at import, whatever makes an image unusable is an image error
        raise ImageError(f"{shown_as}: {e}") from e
    return data, None


def _check_end_marker(tar_path: Path, end: int) -> None:
    """POSIX ends a tar with zero blocks; without one the archive was cut (at a member boundary)."""
    with open(tar_path, "rb") as f:
        f.seek(end)
        block = f.read(BLOCK)
    if len(block) < BLOCK or block.count(0) != BLOCK:
        raise ImageError("truncated tar archive: no end-of-archive marker after the last member")
