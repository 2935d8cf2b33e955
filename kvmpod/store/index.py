"""The store's index: one JSON record per image, and a cache of where images came from.

    images/<hex>.json    ImageRecord: ID, name, labels, import time, size, source, signature status
                         and the manifest, validated once at import
    sources/<key>.json   SourceStamp: a file (or Docker/OCI source) that was imported, with the stat
                         fields that tell whether it changed since; an unchanged file is not read again

One file per record, each replaced atomically: readers never need a lock, and two kvmpod processes
importing different images never contend.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmpod.fsutil import write_atomically

SIGNATURE_UNSIGNED = "unsigned"           # no signature came with the image
SIGNATURE_NOT_CHECKED = "not-checked"     # converted from Docker/OCI: appc signatures do not apply


@dataclass(frozen=True)
class ImageRecord:
    id: str                     # sha512-<128 hex>
    name: str
    labels: dict[str, str]
    imported: float             # Unix time of the first import
    size: int                   # bytes of the uncompressed tar
    source: str                 # the file, URL or Docker/OCI reference it was imported from
    signature: str
    manifest: dict[str, Any]    # as in the image, validated at import

    @property
    def hex(self) -> str:
        return self.id.removeprefix("sha512-")

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ImageRecord:
        obj = json.loads(data)
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})


def read_record(path: Path) -> ImageRecord | None:
    """The record at `path`; None if it is missing or unreadable (a torn store: `image gc` repairs it)."""
    try:
        return ImageRecord.from_json(path.read_bytes())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(path: Path, record: ImageRecord) -> None:
    write_atomically(path, record.to_json())


@dataclass(frozen=True)
class SourceStamp:
    """Identifies one version of a source file: any write changes ctime (and usually size or mtime)."""

    source: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    image_id: str

    @classmethod
    def of(cls, source: str, path: Path, image_id: str) -> SourceStamp | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(source, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, image_id)

    def same_file(self, other: SourceStamp) -> bool:
        return asdict(self) | {"image_id": ""} == asdict(other) | {"image_id": ""}


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def read_stamp(path: Path) -> SourceStamp | None:
    try:
        obj = json.loads(path.read_bytes())
        return SourceStamp(**{k: obj[k] for k in SourceStamp.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_stamp(path: Path, stamp: SourceStamp) -> None:
    write_atomically(path, (json.dumps(asdict(stamp)) + "\n").encode())
