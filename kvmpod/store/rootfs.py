"""An image's assembled rootfs: its dependencies laid down first, then the image, as one disk.

appc (spec/aci.md, "Dependency Matching"): dependencies are found by imageName plus labels, or
pinned by imageID; they are applied in order, each overwriting what came before, depth-first (a
dependency's own dependencies come before it); the top image's pathWhitelist, if not empty, is the
complete list of paths the assembled rootfs keeps. kvmpod has no image discovery: dependencies
must be in the store (`kvmpod fetch` them first). The dependency's `size` field is not checked:
it describes the archive as served, which kvmpod never sees.

An image without dependencies or whitelist is its own disk, `rootfs/<image hex>.iso`; any other
is keyed by what was assembled (the chain of image IDs and the whitelist), so importing a newer
version of a dependency yields a new disk instead of silently reusing the old one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpod.errors import ImageError, PolicyError
from kvmpod.store.refs import IdRef, NameRef
from kvmpod.store.stored import StoredImage

if TYPE_CHECKING:
    from kvmpod.disk.entries import RootfsEntry
    from kvmpod.image.aci import CheckedRootfs

MAX_DEPTH = 16

Find = Callable[[IdRef | NameRef], StoredImage]
"""How a dependency is looked up in the store (Store.find): ImageError when it is not there."""


def resolve_chain(find: Find, image: StoredImage) -> list[StoredImage]:
    """The images whose rootfs make up `image`'s, in the order they are applied (`image` last)."""
    chain: list[StoredImage] = []
    _append_chain(find, image, chain, [])
    return chain


def _append_chain(find: Find, image: StoredImage, chain: list[StoredImage], stack: list[str]) -> None:
    if image.id in stack:
        names = " -> ".join([*stack, image.id])
        raise ImageError(f"{image.manifest.name}: dependency cycle ({names})")
    if len(stack) >= MAX_DEPTH:
        raise ImageError(f"{image.manifest.name}: dependencies nest deeper than {MAX_DEPTH} levels")
    for i, dep in enumerate(image.manifest.dependencies):
        where = f"{image.manifest.name}: dependencies[{i}] {dep.image_name}"
        if dep.image_id:
            hex_prefix = dep.image_id.removeprefix("sha512-")
            try:
                found = find(IdRef(hex_prefix))
            except PolicyError:  # in the store, but refused: the policy's own line says why
                raise
            except ImageError as e:
                raise ImageError(f"{where} ({dep.image_id}) is not in the store: fetch it first") from e
            if found.manifest.name != dep.image_name:
                raise ImageError(f"{where}: image {dep.image_id} is named {found.manifest.name!r}")
        else:
            try:
                found = find(NameRef(dep.image_name, dict(dep.labels)))
            except PolicyError:
                raise
            except ImageError as e:
                labels = "".join(f",{k}={v}" for k, v in dep.labels.items())
                raise ImageError(f"{where}{labels} is not in the store: fetch it first") from e
        _append_chain(find, found, chain, [*stack, image.id])
    chain.append(image)


def disk_key(image: StoredImage, chain: list[StoredImage]) -> str:
    """The name of the disk (without .iso) that holds `image`'s assembled rootfs (`chain`: its
    resolve_chain)."""
    whitelist = image.manifest.path_whitelist
    if len(chain) == 1 and not whitelist:
        return image.hex
    described = "\n".join([*(layer.id for layer in chain), "whitelist:", *sorted(whitelist)])
    return "assembled-" + hashlib.sha256(described.encode()).hexdigest()


def build_rootfs_disk(image: StoredImage, chain: list[StoredImage], disk: Path,
                      checked: CheckedRootfs | None = None) -> None:
    """Write `image`'s assembled rootfs (`chain`: its resolve_chain) to `disk`. The caller holds the
    disk's lock (Store.rootfs_disk). `checked`: the entries its import just checked (kvmpod/image/aci.py),
    used instead of reading the blob's headers again when the image is its own rootfs; the caller
    closes it."""
    # The disk writer (pycdlib, tarfile, the rootfs readers) only when a disk is built: a run whose
    # image has its disk already, and `image list`, never load it.
    import tarfile

    from kvmpod.disk.entries import entries_from_tar
    from kvmpod.disk.iso import build_iso
    from kvmpod.image.layers import Layer, merge_layers

    if checked is not None and len(chain) == 1 and not image.manifest.path_whitelist:
        build_iso(checked.entries, disk)
        return
    with ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(layer.blob, "r:")) for layer in chain]
        entries: Iterable[RootfsEntry]
        if len(chain) == 1 and not image.manifest.path_whitelist:
            entries = entries_from_tar(tars[0])
        else:
            # implied_dirs=False: a directory an upper image does not list keeps the mode and
            # owner a dependency gave it, instead of a made-up 0755 root:root
            layers = [Layer(f"{layer.manifest.name} ({layer.id[:19]})", entries_from_tar(t, implied_dirs=False))
                      for layer, t in zip(chain, tars)]
            entries = merge_layers(layers, path_whitelist=image.manifest.path_whitelist or None)
        build_iso(entries, disk)
