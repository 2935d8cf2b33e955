"""Finding one image in a docker-archive or an OCI image layout: its config and its layers.

docker-archive (`docker save`, `podman save`, `buildah push docker-archive:`): `manifest.json`
lists the images, each with its config file, layer tars and repo tags. The config's rootfs.diff_ids
check every layer; a config or layer named by its digest (`<hex>.json`, `blobs/sha256/<hex>`) is
checked against that digest too.

OCI image layout (`oci:` directory, `oci-archive:` tar of one): `oci-layout`, `index.json` and
content-addressed `blobs/<alg>/<hex>`; every blob is checked against its descriptor's digest and
size. An image index inside is resolved to its linux/amd64 manifest (what a kvmpod guest runs).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from kvmpod.errors import ImageError
from kvmpod.image.oci.blobs import DIGEST, Archive, LayerBlob, blob_name, member_name

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # docker/containerd exports: the full reference

_INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json"}
_MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json"}
_CONFIG_TYPES = {"application/vnd.oci.image.config.v1+json",
                 "application/vnd.docker.container.image.v1+json"}
_LAYER_TYPE = re.compile(r"^application/vnd\.(oci\.image\.layer(\.nondistributable)?\.v1\.tar(\+gzip|\+zstd)?"
                         r"|docker\.image\.rootfs(\.foreign)?\.diff\.tar(\.gzip)?)\Z")
# Files a docker-archive names by their digest: docker's `<hex>.json` configs and the `blobs/`
# of docker 25+. (podman's `<hex>.tar` layers are named by diff_id, which is checked anyway.)
_NAMED_BY_DIGEST = re.compile(r"^(?:blobs/(sha256|sha512)/([0-9a-f]+)|([0-9a-f]{64})\.json)\Z")
_MAX_INDEX_DEPTH = 4
_RUNNABLE_PLATFORM = ("linux", "amd64")  # an OCI platform (GOOS/GOARCH) a kvmpod guest runs


@dataclass(frozen=True)
class SourceImage:
    config: dict[str, Any]
    config_digest: str
    manifest_digest: str | None  # the OCI/Docker image manifest's, when the source has one
    layers: list[LayerBlob]  # lowest first
    ref_name: str | None  # the tag or reference it was found under, as the source spells it
    full_name: str | None = None  # a full reference a docker/containerd export adds to a bare tag


def docker_archive_image(archive: Archive, want: str | None) -> SourceImage:
    items = archive.read_json("manifest.json", missing="not a docker-archive?")
    where = f"{archive.shown}: manifest.json"
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items) or not items:
        raise ImageError(f"{where}: not a list of images")
    item, tag = _pick_docker_item(items, want, where)
    config_name = member_name(item.get("Config"), f"{where}: Config")
    config_digest = _digest_in_name(config_name)
    config = archive.read_json(config_name, digest=config_digest, missing="manifest.json names it")
    config_digest = config_digest or archive.digest_of(config_name)
    layer_names = item.get("Layers")
    if not isinstance(layer_names, list):
        raise ImageError(f"{where}: Layers is not a list")
    names = [member_name(n, f"{where}: Layers[{i}]") for i, n in enumerate(layer_names)]
    diff_ids = _diff_ids(config, len(names), f"{archive.shown}: {config_name}")
    layers = [LayerBlob(n, _digest_in_name(n), d) for n, d in zip(names, diff_ids)]
    return SourceImage(_config_object(config, archive, config_name), config_digest, None, layers, tag)


def _pick_docker_item(items: list[dict], want: str | None, where: str) -> tuple[dict, str | None]:
    def tags(item: dict) -> list[str]:
        found = item.get("RepoTags") or []
        return [t for t in found if isinstance(t, str)] if isinstance(found, list) else []

    if want is None:
        if len(items) > 1:
            shown = ", ".join(t for i in items for t in tags(i)[:1]) or "none tagged"
            raise ImageError(f"{where}: the archive holds {len(items)} images; choose one with "
                             f"docker-archive:FILE:NAME:TAG ({shown})")
        return items[0], next(iter(tags(items[0])), None)
    wanted = _normalised(want)
    for item in items:
        for tag in tags(item):
            if tag == want or _normalised(tag) == wanted:
                return item, tag
    shown = ", ".join(t for i in items for t in tags(i)) or "none tagged"
    raise ImageError(f"{where}: no image is tagged {want} (tags: {shown})")


def _normalised(reference: str) -> str:
    domain, path, tag = split_reference(reference)
    return f"{domain}/{path}:{tag or 'latest'}"


def split_reference(reference: str) -> tuple[str, str, str | None]:
    """A Docker reference as (registry, repository, tag), normalised the way docker does.

    "busybox" -> ("docker.io", "library/busybox", None); "quay.io/a/b:1" -> ("quay.io", "a/b", "1");
    a digest ("@sha256:...") is dropped.
    """
    name = reference.partition("@")[0]
    tag = None
    if name.rfind(":") > name.rfind("/"):
        name, _, tag = name.rpartition(":")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = "docker.io", name
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path:
        path = f"library/{path}"
    return domain, path, tag


def oci_layout_image(archive: Archive, want: str | None) -> SourceImage:
    layout = archive.read_json("oci-layout", missing="not an OCI image layout?")
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageError(f"{archive.shown}: oci-layout: unsupported imageLayoutVersion {json.dumps(version)}")
    index = archive.read_json("index.json", missing="not an OCI image layout?")
    descriptors = _descriptors(index, f"{archive.shown}: index.json")
    top = _pick_tagged(descriptors, want, archive.shown)
    annotations = top.get("annotations") or {}
    manifest_descriptor = _platform_manifest(archive, top, 0)
    manifest_digest = manifest_descriptor["digest"]
    manifest_name = blob_name(manifest_digest, archive.shown)
    where = f"{archive.shown}: {manifest_name}"
    manifest = archive.read_json(manifest_name, digest=manifest_digest, size=manifest_descriptor["size"],
                                 missing="index.json names it")
    if not isinstance(manifest, dict):
        raise ImageError(f"{where}: not an image manifest")
    config_descriptor = _descriptor(manifest.get("config"), f"{where}: config")
    if config_descriptor.get("mediaType") not in _CONFIG_TYPES:
        raise ImageError(f"{where}: config has media type {json.dumps(config_descriptor.get('mediaType'))}: "
                         "not a container image")
    config_name = blob_name(config_descriptor["digest"], where)
    config = archive.read_json(config_name, digest=config_descriptor["digest"], size=config_descriptor["size"],
                               missing="the image manifest names it")
    layer_descriptors = manifest.get("layers")
    if not isinstance(layer_descriptors, list):
        raise ImageError(f"{where}: layers is not a list")
    diff_ids = _diff_ids(config, len(layer_descriptors), f"{archive.shown}: {config_name}")
    layers = []
    for i, (raw, diff_id) in enumerate(zip(layer_descriptors, diff_ids)):
        d = _descriptor(raw, f"{where}: layers[{i}]")
        if not _LAYER_TYPE.match(str(d.get("mediaType"))):
            raise ImageError(f"{where}: layers[{i}]: unsupported media type {json.dumps(d.get('mediaType'))}")
        layers.append(LayerBlob(blob_name(d["digest"], where), d["digest"], diff_id, d["size"]))
    ref_name = annotations.get(REF_NAME)
    full_name = annotations.get(CONTAINERD_NAME)
    return SourceImage(_config_object(config, archive, config_name), config_descriptor["digest"], manifest_digest,
                       layers, ref_name if isinstance(ref_name, str) else None,
                       full_name if isinstance(full_name, str) else None)


def _descriptors(index: Any, where: str) -> list[dict[str, Any]]:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise ImageError(f"{where}: manifests is not a list")
    return [_descriptor(d, f"{where}: manifests[{i}]") for i, d in enumerate(manifests)]


def _descriptor(raw: Any, where: str) -> dict[str, Any]:
    """A descriptor whose digest is well-formed (no traversal) and whose size is an integer."""
    if not isinstance(raw, dict):
        raise ImageError(f"{where}: not a descriptor object")
    blob_name(raw.get("digest"), where)
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{where}: size {json.dumps(size)} is not a non-negative integer")
    return raw


def _tag_of(descriptor: dict[str, Any]) -> str | None:
    annotations = descriptor.get("annotations")
    tag = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
    return tag if isinstance(tag, str) else None


def _pick_tagged(descriptors: list[dict[str, Any]], want: str | None, shown: str) -> dict[str, Any]:
    def listing() -> str:
        return ", ".join(_tag_of(d) or f"untagged {d['digest'][:19]}…" for d in descriptors) or "none"

    if want is None:
        if len(descriptors) != 1:
            raise ImageError(f"{shown}: index.json holds {len(descriptors)} images; choose one with "
                             f"oci:DIR:TAG or oci-archive:FILE:TAG (tags: {listing()})")
        return descriptors[0]
    found = [d for d in descriptors if _tag_of(d) == want]
    if len(found) != 1:
        problem = "no image is" if not found else f"{len(found)} images are"
        raise ImageError(f"{shown}: index.json: {problem} tagged {want} (tags: {listing()})")
    return found[0]


def _platform_manifest(archive: Archive, descriptor: dict[str, Any], depth: int) -> dict[str, Any]:
    """The image manifest a descriptor leads to: an index resolves to its linux/amd64 entry."""
    media_type = descriptor.get("mediaType")
    if media_type in _MANIFEST_TYPES:
        return descriptor
    name = blob_name(descriptor["digest"], archive.shown)
    where = f"{archive.shown}: {name}"
    if media_type not in _INDEX_TYPES:
        raise ImageError(f"{where}: media type {json.dumps(media_type)} is not an image manifest or index")
    if depth >= _MAX_INDEX_DEPTH:
        raise ImageError(f"{where}: image indexes nested more than {_MAX_INDEX_DEPTH} deep")
    index = archive.read_json(name, digest=descriptor["digest"], size=descriptor["size"],
                              missing="an index names it")
    entries = _descriptors(index, where)
    runnable = [d for d in entries
                if isinstance(d.get("platform"), dict)
                and (d["platform"].get("os"), d["platform"].get("architecture")) == _RUNNABLE_PLATFORM]
    if not runnable:
        platforms = sorted({f"{p.get('os')}/{p.get('architecture')}" for d in entries
                            if isinstance(p := d.get("platform"), dict)})
        raise ImageError(f"{where}: no {'/'.join(_RUNNABLE_PLATFORM)} image in this index "
                         f"(platforms: {', '.join(platforms) or 'none given'})")
    return _platform_manifest(archive, runnable[0], depth + 1)


def _digest_in_name(name: str) -> str | None:
    """The digest a docker-archive file name carries (`<hex>.json`, `blobs/sha256/<hex>`), if any."""
    m = _NAMED_BY_DIGEST.match(name)
    if m is None:
        return None
    digest = f"{m.group(1)}:{m.group(2)}" if m.group(1) else f"sha256:{m.group(3)}"
    return digest if DIGEST.match(digest) else None


def _diff_ids(config: Any, count: int, where: str) -> list[str]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and DIGEST.match(d) for d in diff_ids):
        raise ImageError(f"{where}: rootfs.diff_ids is not a list of digests")
    if len(diff_ids) != count:
        raise ImageError(f"{where}: rootfs.diff_ids lists {len(diff_ids)} layers, the manifest {count}")
    return diff_ids


def _config_object(config: Any, archive: Archive, name: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise ImageError(f"{archive.shown}: {name}: the image config is not a JSON object")
    return config
