"""Docker and OCI images converted to ACIs (docs/oci.md).

    ref = parse_reference("docker-archive:busybox.tar")   # or oci-archive:FILE[:TAG], oci:DIR[:TAG]
    manifest = convert(ref, out, tmp_dir=work_dir)         # writes the uncompressed ACI tar to `out`

The source is read in place (blobs.py), the image found in it (layout.py), every layer checked
against its digests and run through the ACI entry rules (entries_from_tar), the layers merged with
their whiteouts (kvmpod.image.layers), the config mapped to an appc manifest (config.py), and the
result written as a deterministic ACI: converting the same image twice gives the same image ID.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kvmpod.disk.entries import RootfsEntry, entries_from_tar
from kvmpod.errors import ImageError
from kvmpod.image.layers import Layer, merge_layers, write_aci
from kvmpod.image.limits import ImportLimits
from kvmpod.image.oci.blobs import Archive, Budget, open_layer
from kvmpod.image.oci.config import RootfsView, image_manifest
from kvmpod.image.oci.layout import docker_archive_image, oci_layout_image
from kvmpod.progress import Advance

TRANSPORTS = ("docker-archive", "oci-archive", "oci")


@dataclass(frozen=True)
class OciReference:
    """`docker-archive:FILE[:NAME:TAG]`, `oci-archive:FILE[:TAG]` or `oci:DIR[:TAG]`.

    As in containers/image, the path ends at the first ':' after the transport; the rest is the tag
    (an OCI `org.opencontainers.image.ref.name`, or one of a docker-archive's RepoTags).
    """

    transport: str
    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")

    def canonical(self) -> str:
        """The same text for the same image however its path was spelled."""
        return f"{self.transport}:{os.path.realpath(self.path)}" + (f":{self.tag}" if self.tag else "")


def parse_reference(text: str) -> OciReference | None:
    """The reference `text` names; None when it has none of the three prefixes."""
    transport, colon, rest = text.partition(":")
    if not colon or transport not in TRANSPORTS:
        return None
    path, colon, tag = rest.partition(":")
    if not path:
        raise ImageError(f"{text}: no {'directory' if transport == 'oci' else 'file'} after '{transport}:'")
    if colon and not tag:
        raise ImageError(f"{text}: empty tag after the path")
    return OciReference(transport, Path(path), tag or None)


def convert(ref: OciReference, out: BinaryIO, *, tmp_dir: Path, progress: Advance | None = None,
            limits: ImportLimits | None = None, shown: str | None = None) -> dict[str, Any]:
    """Write the image `ref` names to `out` as an uncompressed ACI and return its manifest.

    Temporary files (a compressed archive or layer, decompressed) go to `tmp_dir` and have no name
    there: nothing is left behind, whatever happens. `progress(n)` is told of every n bytes of the
    source's blobs read. `limits` caps the uncompressed size of the layers and their entry count.
    `shown` names an `oci:` layout in errors instead of its path (a registry pull's `docker://…`).
    """
    advance = progress or _ignore
    limits = limits or ImportLimits()
    with ExitStack() as stack:
        if ref.transport == "oci":
            archive = Archive.from_dir(ref.path, stack, shown)
        else:
            if not ref.path.is_file():
                raise ImageError(f"{ref.path}: no such file")
            archive = Archive.from_tar(ref.path, tmp_dir, stack, limits, advance)
        find = docker_archive_image if ref.transport == "docker-archive" else oci_layout_image
        image = find(archive, ref.tag)
        budget = Budget(archive.shown, limits.max_size)
        counter = _EntryCounter(limits.max_entries)
        layers = []
        for blob in image.layers:
            data, size = open_layer(archive, blob, tmp_dir=tmp_dir, stack=stack, budget=budget, advance=advance)
            name = f"{archive.shown}: {blob.name}"
            layers.append(Layer(name, counter.count(_layer_entries(data, size, name, stack))))
        rootfs = merge_layers(layers, whiteouts=True)
        manifest = image_manifest(image, RootfsView(rootfs), archive.shown)
        write_aci(rootfs, manifest, out)
        return manifest


def _ignore(_: int) -> None:
    pass


def _layer_entries(data: BinaryIO, size: int, name: str, stack: ExitStack) -> Iterator[RootfsEntry]:
    """A layer tar's entries under the ACI rules; the tar stays open until `stack` closes."""
    if size == 0:
        return iter(())  # `docker save` wrote empty layers as empty files
    try:
        tar = stack.enter_context(tarfile.open(fileobj=data, mode="r:"))
    except tarfile.TarError as e:
        raise ImageError(f"{name}: not a tar archive: {e}") from e
    return entries_from_tar(tar, prefix="", implied_dirs=False, lower_links=True)


class _EntryCounter:
    """Stops a conversion whose layers hold more entries than ImportLimits.max_entries."""

    def __init__(self, limit: int):
        self._limit, self._seen = limit, 0

    def count(self, entries: Iterator[RootfsEntry]) -> Iterator[RootfsEntry]:
        for entry in entries:
            self._seen += 1
            if self._seen > self._limit:
                raise ImageError(f"the layers hold more than {self._limit} entries; "
                                 "if that is genuine, raise [image] max-entries in kvmpod.toml")
            yield entry
