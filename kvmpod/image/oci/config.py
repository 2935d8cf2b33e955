"""A Docker/OCI image config as an appc ImageManifest, following docker2aci's conventions.

docs/oci.md has the mapping table. Where Docker decides something when a container starts (the
PATH lookup of a relative command, the primary group of a user given without one), this module
decides it now, from the image's own merged rootfs, because an appc exec must be an absolute path
and an appc app always names its group.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Iterable
from typing import Any

from kvmpod.disk.entries import ROOT_PATH, EntryKind, RootfsEntry
from kvmpod.errors import ImageError
from kvmpod.image.manifest import AC_VERSION, VALID_OS_ARCH, parse_manifest
from kvmpod.image.names import AC_IDENTIFIER
from kvmpod.image.oci.layout import SourceImage, split_reference

DOCKER_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# docker2aci's annotation names (lib/common), so tools that know converted images recognise them.
ANNOTATION_PREFIX = "appc.io/docker/"

# appc spec ToAppcOSArch: (GOARCH, variant) -> appc arch; a variant not listed falls back to "".
_ARCH = {("amd64", ""): "amd64", ("386", ""): "i386", ("arm64", ""): "aarch64", ("arm64", "v8"): "aarch64",
         ("arm", ""): "armv6l", ("arm", "v6"): "armv6l", ("arm", "v7"): "armv7l", ("ppc64", ""): "ppc64",
         ("ppc64le", ""): "ppc64le", ("s390x", ""): "s390x"}
_TAG = re.compile(r"^[\w][\w.-]{0,127}\Z")  # a bare Docker tag, as opposed to a name:tag reference
_MAX_ETC_FILE = 1 << 20
_MAX_SYMLINK_HOPS = 40  # Linux's limit


def image_manifest(image: SourceImage, rootfs: RootfsView, shown: str) -> dict[str, Any]:
    """The ImageManifest dict of `image`, validated by parse_manifest."""
    config = image.config
    inner = config.get("config") or {}  # Docker's "container_config" is the build step's, not the image's
    if not isinstance(inner, dict):
        raise ImageError(f"{shown}: config: \"config\" is not an object")
    domain, repository, tag, original = _naming(image)
    # An untagged image is named after its config digest, the ID `docker images` shows.
    name = _ac_identifier(f"{domain}/{repository}") if repository else image.config_digest.replace(":", "-")

    labels: dict[str, str] = {}
    if tag:
        labels["version"] = tag
    labels.update(_os_arch(config, shown))

    annotations: dict[str, str] = {}
    for key, value in (("authors", config.get("author")), ("created", config.get("created")),
                       (ANNOTATION_PREFIX + "originalname", original),
                       (ANNOTATION_PREFIX + "registryurl", domain),
                       (ANNOTATION_PREFIX + "repository", repository),
                       (ANNOTATION_PREFIX + "tag", tag),
                       (ANNOTATION_PREFIX + "imageid", image.config_digest),
                       (ANNOTATION_PREFIX + "manifesthash", image.manifest_digest),
                       (ANNOTATION_PREFIX + "entrypoint", _json_list(inner.get("Entrypoint"))),
                       (ANNOTATION_PREFIX + "cmd", _json_list(inner.get("Cmd")))):
        if isinstance(value, str) and value:
            annotations[key] = value
    docker_labels = inner.get("Labels") or {}
    if isinstance(docker_labels, dict):
        for key in sorted(docker_labels):
            # Annotation names are AC Identifiers; other label names are dropped (docs/oci.md).
            if AC_IDENTIFIER.match(key) and key not in annotations and isinstance(docker_labels[key], str):
                annotations[key] = docker_labels[key]

    manifest: dict[str, Any] = {
        "acKind": "ImageManifest",
        "acVersion": AC_VERSION,
        "name": name,
        "labels": [{"name": k, "value": v} for k, v in labels.items()],
    }
    app = _app(inner, rootfs, shown)
    if app is not None:
        manifest["app"] = app
    if annotations:
        manifest["annotations"] = [{"name": k, "value": v} for k, v in annotations.items()]
    try:
        parse_manifest(json.dumps(manifest).encode())
    except ImageError as e:
        raise ImageError(f"{shown}: the converted {e}") from e
    return manifest


def _naming(image: SourceImage) -> tuple[str | None, str | None, str | None, str | None]:
    """(registry, repository, tag, the reference as the source spells it) of the image, where known."""
    ref = image.ref_name
    if ref and _TAG.match(ref):  # a bare tag, as `skopeo copy ... oci:DIR:TAG` writes
        if image.full_name:
            domain, repository, tag = split_reference(image.full_name)
            return domain, repository, tag or ref, image.full_name
        return None, None, ref, ref
    if ref:
        domain, repository, tag = split_reference(ref)
        return domain, repository, tag or "latest", ref
    return None, None, None, None


def _ac_identifier(text: str) -> str:
    """`text` as an AC Identifier: lower case, other characters as '-', runs of separators as one."""
    s = re.sub(r"[^a-z0-9._~/-]", "-", text.lower())
    s = re.sub(r"([-._~/])[-._~/]+", r"\1", s).strip("-._~/")
    return s or "unnamed"


def _ac_name(text: str) -> str:
    """`text` as an AC Name (lower-case alphanumerics separated by single '-')."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unnamed"


def _os_arch(config: dict[str, Any], shown: str) -> dict[str, str]:
    os_ = config.get("os")
    if not os_:
        return {}  # appc: an image without the label does not depend on the OS
    arch, variant = config.get("architecture") or "", config.get("variant") or ""
    appc_arch = _ARCH.get((arch, variant)) or _ARCH.get((arch, ""))
    if os_ not in VALID_OS_ARCH or (arch and appc_arch not in VALID_OS_ARCH[os_]):
        platform = "/".join(p for p in (os_, arch, variant) if p)
        raise ImageError(f"{shown}: config: platform {platform} has no appc os/arch label")
    return {"os": os_, "arch": appc_arch} if appc_arch else {"os": os_}


def _json_list(value: Any) -> str | None:
    # Go's json.Marshal layout, as docker2aci writes these annotations.
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list) and value else None


def _strings(value: Any, field: str, shown: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{shown}: config: {field} is not a list of strings")
    return value


def _app(inner: dict[str, Any], rootfs: RootfsView, shown: str) -> dict[str, Any] | None:
    environment: dict[str, str] = {}
    for item in _strings(inner.get("Env"), "Env", shown):
        key, eq, value = item.partition("=")
        if eq and key:  # docker2aci skips entries without '='
            environment[key] = value  # a later duplicate wins, as in Docker
    workdir = inner.get("WorkingDir") or "/"
    if not isinstance(workdir, str):
        raise ImageError(f"{shown}: config: WorkingDir is not a string")
    workdir = posixpath.normpath(posixpath.join("/", workdir))
    exec_ = _strings(inner.get("Entrypoint"), "Entrypoint", shown) + _strings(inner.get("Cmd"), "Cmd", shown)
    if not exec_:
        return None  # appc requires an exec; the image can still be run with an explicit one
    exec_[0] = _absolute_command(exec_[0], workdir, environment.get("PATH", DOCKER_DEFAULT_PATH), rootfs, shown)
    user, group = _user_group(inner.get("User") or "", rootfs, shown)
    app: dict[str, Any] = {"exec": exec_, "user": user, "group": group, "workingDirectory": workdir}
    if environment:
        app["environment"] = [{"name": k, "value": v} for k, v in environment.items()]
    if mount_points := _mount_points(inner.get("Volumes"), shown):
        app["mountPoints"] = mount_points
    if ports := _ports(inner.get("ExposedPorts"), shown):
        app["ports"] = ports
    return app


def _absolute_command(command: str, workdir: str, path: str, rootfs: RootfsView, shown: str) -> str:
    """exec[0] as an absolute path: what Docker's runtime would run for it in this image."""
    if command.startswith("/"):
        return command
    if "/" in command:  # relative to the working directory, as execve sees it
        return posixpath.normpath(posixpath.join(workdir, command))
    for directory in path.split(":"):
        if directory.startswith("/"):
            candidate = posixpath.normpath(posixpath.join(directory, command))
            if rootfs.is_executable(candidate):
                return candidate
    raise ImageError(f"{shown}: config: the command {command!r} (the first word of Entrypoint/Cmd) is not an "
                     f"executable in the image's PATH ({path}); appc needs an absolute path")


def _user_group(spec: str, rootfs: RootfsView, shown: str) -> tuple[str, str]:
    """Docker's User (`name`, `uid`, `uid:gid`, `name:group`; empty is root) as appc user and group."""
    if not isinstance(spec, str):
        raise ImageError(f"{shown}: config: User is not a string")
    if not spec:
        return "0", "0"
    user, colon, group = spec.partition(":")
    user = user or "0"
    if colon and group:
        return user, group
    # Docker runs a user given alone with the primary group /etc/passwd gives it, else gid 0.
    for line in rootfs.read_text("/etc/passwd").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and user in (fields[0], fields[2]) and fields[3].isdigit():
            return user, fields[3]
    return user, "0"


def _mount_points(volumes: Any, shown: str) -> list[dict[str, Any]]:
    if not volumes:
        return []
    if not isinstance(volumes, dict):
        raise ImageError(f"{shown}: config: Volumes is not an object")
    mount_points: list[dict[str, Any]] = []
    used: set[str] = set()
    for path in sorted(volumes):
        if not path.startswith("/"):
            raise ImageError(f"{shown}: config: Volumes: {path!r} is not an absolute path")
        name = base = _ac_name(f"volume-{path}")
        number = 1
        while name in used:  # "/a-b" and "/a/b" both give "volume-a-b"
            number += 1
            name = f"{base}-{number}"
        used.add(name)
        mount_points.append({"name": name, "path": path})
    return mount_points


def _ports(exposed: Any, shown: str) -> list[dict[str, Any]]:
    if not exposed:
        return []
    if not isinstance(exposed, dict):
        raise ImageError(f"{shown}: config: ExposedPorts is not an object")
    ports = []
    for key in exposed:
        number, _, protocol = key.partition("/")
        protocol = protocol or "tcp"
        if not number.isdigit() or not 1 <= int(number) <= 65535:
            raise ImageError(f"{shown}: config: ExposedPorts: {key!r} is not PORT[/PROTOCOL]")
        ports.append({"name": _ac_name(f"{number}-{protocol}"), "protocol": protocol, "port": int(number)})
    return sorted(ports, key=lambda p: p["name"])


class RootfsView:
    """Path lookups in a merged rootfs, following its symlinks inside it (as a chroot would)."""

    def __init__(self, entries: Iterable[RootfsEntry]):
        self._by_path = {e.path: e for e in entries if e.path != ROOT_PATH}

    def _resolve(self, path: str) -> RootfsEntry | None:
        """The entry at absolute `path` with every symlink followed; a hard link gives its file."""
        todo = [p for p in reversed(path.split("/")) if p and p != "."]
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop()
            if part == "..":
                if done:
                    done.pop()
                continue
            entry = self._by_path.get("/".join([*done, part]))
            if entry is None:
                return None
            if entry.kind is EntryKind.SYMLINK:
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    return None
                if entry.link_target.startswith("/"):
                    done = []
                todo.extend(p for p in reversed(entry.link_target.split("/")) if p and p != ".")
                continue
            if todo and entry.kind is not EntryKind.DIR:
                return None
            done.append(part)
        entry = self._by_path.get("/".join(done)) if done else None
        if entry is not None and entry.kind is EntryKind.HARDLINK:
            entry = self._by_path.get(entry.link_target)
        return entry

    def is_executable(self, path: str) -> bool:
        entry = self._resolve(path)
        return entry is not None and entry.kind is EntryKind.FILE and bool(entry.mode & 0o111)

    def read_text(self, path: str) -> str:
        """A small text file of the image ('' if it is missing, not a file, or too big to be one)."""
        entry = self._resolve(path)
        if entry is None or entry.kind is not EntryKind.FILE or entry.opener is None or entry.size > _MAX_ETC_FILE:
            return ""
        try:
            with entry.opener() as f:
                return f.read(entry.size).decode("utf-8", "replace")
        except (OSError, tarfile.TarError) as e:
            raise ImageError(f"{path}: cannot read it from the image: {e}") from e
