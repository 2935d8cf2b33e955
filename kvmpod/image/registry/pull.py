"""One image out of a registry into an OCI image layout, for the OCI -> ACI converter.

resolve() asks for the manifest the reference names (always: a tag may have moved) and, for an
index or manifest list, its linux/amd64 manifest (what a kvmpod guest runs). write_layout() writes
`oci-layout`, `index.json` and `blobs/<alg>/<hex>` for that manifest: blobs the caller already has
(the store's layer cache) are hard-linked in, the others downloaded, each checked against its
descriptor's digest and size as it arrives. kvmpod/image/oci then converts the layout like any
`oci:DIR`, checking every digest again and each layer's diff_id.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmpod.errors import ImageError
from kvmpod.image.limits import human_size
from kvmpod.image.oci.blobs import blob_name
from kvmpod.image.registry.client import INDEX_TYPES, MANIFEST_TYPES, Manifest, RegistryClient
from kvmpod.image.registry.reference import DockerReference
from kvmpod.progress import progress

REF_NAME = "org.opencontainers.image.ref.name"
FULL_NAME = "io.containerd.image.name"   # the converter takes the repository from it (docs/oci.md)
RUNNABLE = ("linux", "amd64")

Cached = Callable[[str], Path | None]   # a digest -> the path of a blob already on this host, if any


@dataclass(frozen=True)
class Resolved:
    top_digest: str      # what the tag points to (an index or a manifest): the store record's source
    manifest: Manifest   # the linux/amd64 image manifest


@dataclass(frozen=True)
class Layout:
    path: Path
    tag: str             # the layout's ref.name: what the converter is asked for
    blobs: list[str]     # the digests in it: manifest, config, layers


def resolve(client: RegistryClient, cached: Cached) -> Resolved:
    ref = client.ref
    top = client.manifest(ref.wanted)
    if top.media_type in MANIFEST_TYPES:
        return Resolved(top.digest, top)
    entry = _platform_entry(top, ref)
    digest, size = entry["digest"], entry["size"]
    if (path := cached(digest)) is not None and _digest_of(path, digest) == digest:
        data = path.read_bytes()
        media_type = json.loads(data).get("mediaType") or entry.get("mediaType")
        return Resolved(top.digest, Manifest(data, str(media_type), digest))
    manifest = client.manifest(digest, expected_size=size)
    if manifest.media_type not in MANIFEST_TYPES:
        raise ImageError(f"{ref}: {digest}: the index's {'/'.join(RUNNABLE)} entry is a "
                         f"{manifest.media_type}, not an image manifest")
    return Resolved(top.digest, manifest)


def write_layout(client: RegistryClient, resolved: Resolved, path: Path, cached: Cached) -> Layout:
    """The OCI image layout of the resolved image in the empty directory `path`."""
    ref = client.ref
    manifest = resolved.manifest
    document = manifest.json(f"{ref}: {manifest.digest}")
    descriptors = [_descriptor(document.get("config"), f"{ref}: {manifest.digest}: config")]
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{ref}: {manifest.digest}: layers is not a list")
    descriptors += [_descriptor(d, f"{ref}: {manifest.digest}: layers[{i}]") for i, d in enumerate(layers)]
    total = sum(d["size"] for d in descriptors)
    if total > client.limits.max_size:
        raise ImageError(f"{ref}: the image's blobs are {human_size(total)}, more than the "
                         f"{human_size(client.limits.max_size)} image limit ([image] max-size in kvmpod.toml)")

    (path / "blobs").mkdir()
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    _write_blob(path, manifest.digest, manifest.data)
    unique = list({d["digest"]: d for d in descriptors}.values())  # a layer may appear twice
    missing = [d for d in unique if not _link_cached(path, d["digest"], cached)]
    for i, d in enumerate(missing, 1):
        dest = path / blob_name(d["digest"], str(ref))
        dest.parent.mkdir(exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        label = f"pulling {d['digest'].partition(':')[2][:12]} ({i}/{len(missing)})"
        with progress(label, d["size"]) as advance:
            client.fetch_blob(d["digest"], d["size"], partial, advance)
        os.replace(partial, dest)

    # A tag names the converted image (its version label); a digest alone gives "sha256-<hex>".
    tag = ref.tag or ref.wanted.replace(":", "-")
    full = f"{ref.name}:{ref.tag}" if ref.tag else f"{ref.name}@{ref.digest}"
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.data),
                            "annotations": {REF_NAME: tag, FULL_NAME: full}}]}
    (path / "index.json").write_text(json.dumps(index))
    return Layout(path, tag, [manifest.digest, *(d["digest"] for d in descriptors)])


def _platform_entry(index: Manifest, ref: DockerReference) -> dict[str, Any]:
    where = f"{ref}: {index.digest}"
    entries = index.json(where).get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{where}: manifests is not a list")
    checked = [_descriptor(e, f"{where}: manifests[{i}]") for i, e in enumerate(entries)]
    runnable = [e for e in checked if isinstance(p := e.get("platform"), dict)
                and (p.get("os"), p.get("architecture")) == RUNNABLE]
    if not runnable:
        platforms = sorted({f"{p.get('os')}/{p.get('architecture')}" for e in checked
                            if isinstance(p := e.get("platform"), dict)})
        raise ImageError(f"{where}: no {'/'.join(RUNNABLE)} image in this index "
                         f"(platforms: {', '.join(platforms) or 'none given'})")
    plain = [e for e in runnable if not e["platform"].get("variant")]
    chosen = (plain or runnable)[0]
    if chosen.get("mediaType") in INDEX_TYPES:
        raise ImageError(f"{where}: the {'/'.join(RUNNABLE)} entry is another index (nested indexes are not pulled)")
    return chosen


def _descriptor(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ImageError(f"{where}: not a descriptor object")
    blob_name(raw.get("digest"), where)  # sha256:<64 hex> or sha512:<128 hex>, nothing else
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{where}: size {json.dumps(size)} is not a non-negative integer")
    return raw


def _write_blob(layout: Path, digest: str, data: bytes) -> None:
    dest = layout / blob_name(digest, str(layout))
    dest.parent.mkdir(exist_ok=True)
    dest.write_bytes(data)


def _link_cached(layout: Path, digest: str, cached: Cached) -> bool:
    """Hard-link a blob this host has into the layout (the converter checks its digest again)."""
    source = cached(digest)
    if source is None:
        return False
    dest = layout / blob_name(digest, str(layout))
    dest.parent.mkdir(exist_ok=True)
    try:
        os.link(source, dest)
    except FileExistsError:
        pass  # the same blob twice in one image
    except FileNotFoundError:
        return False  # removed since it was looked up
    return True


def _digest_of(path: Path, digest: str) -> str:
    algorithm = digest.partition(":")[0]
    with path.open("rb") as f:
        return f"{algorithm}:{hashlib.file_digest(f, algorithm).hexdigest()}"
