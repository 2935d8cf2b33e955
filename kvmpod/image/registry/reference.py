"""`docker://[HOST/]REPO[:TAG|@DIGEST]`: a Docker reference, normalised as docker and skopeo do.

A first component with a '.' or ':' or that is `localhost` is the registry host; otherwise the
image is on Docker Hub (`docker.io`, API at registry-1.docker.io) and a one-component name gets
`library/`. No tag and no digest means `latest`. With both, the digest is what is pulled and the
tag names the converted image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmpod.errors import UsageError

SCHEME = "docker://"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"^[\w][\w.-]{0,127}\Z")
_DIGEST = re.compile(r"^(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")
_HOST = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?\Z")


@dataclass(frozen=True)
class DockerReference:
    host: str                   # as written (docker.io for Docker Hub)
    repository: str             # library/busybox
    tag: str | None = None      # None only with a digest
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Where the registry's API is: Docker Hub's is not at docker.io."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def name(self) -> str:
        """host/repository, as docker prints it (docker.io/library/busybox)."""
        return f"{self.host}/{self.repository}"

    @property
    def wanted(self) -> str:
        """What the manifest request asks for: the digest if given, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        return SCHEME + self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def resolved(self, digest: str) -> str:
        """The reference with the digest the pull resolved it to: the store record's source."""
        return SCHEME + self.name + (f":{self.tag}" if self.tag else "") + f"@{digest}"


def parse_docker_reference(text: str) -> DockerReference:
    """`docker://…` -> the reference; a malformed one is a UsageError naming it and the bad part."""
    if not text.startswith(SCHEME):
        raise UsageError(f"{text}: not a docker:// reference")
    rest = text[len(SCHEME):]
    if not rest:
        raise UsageError(f"{text}: no image after docker://")
    name, at, digest = rest.partition("@")
    if at and not _DIGEST.match(digest):
        raise UsageError(f"{text}: {digest!r} is not a digest (sha256:<64 hex> or sha512:<128 hex>)")
    tag: str | None = None
    if name.rfind(":") > name.rfind("/"):
        name, _, tag = name.rpartition(":")
        if not _TAG.match(tag):
            raise UsageError(f"{text}: {tag!r} is not a tag (letters, digits, '_', '.', '-'; at most 128)")
    first, slash, path = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host = first
        if not _HOST.match(host):
            raise UsageError(f"{text}: {host!r} is not a registry host[:port]")
    else:
        host, path = DOCKER_HUB, name
    if host in ("index.docker.io", DOCKER_HUB_API):
        host = DOCKER_HUB
    if host == DOCKER_HUB and path and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_COMPONENT.match(c) for c in path.split("/")):
        raise UsageError(f"{text}: {path!r} is not a repository name (lower-case letters and digits, "
                         "separated by '.', '_', '-' or '/')")
    if len(host) + 1 + len(path) > 255:
        raise UsageError(f"{text}: the repository name is longer than 255 characters")
    return DockerReference(host, path, tag if tag or at else DEFAULT_TAG, digest or None)
