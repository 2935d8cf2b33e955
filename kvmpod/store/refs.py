"""What the user typed as IMAGE: a file, a URL, a Docker/OCI source, an image ID or a store name.

Pure parsing, no I/O beyond one stat: the store resolves the result (kvmpod/store/store.py).
The rules, in order (docs/cli.md):
1. `docker-archive:FILE`, `oci-archive:FILE`, `oci:DIR[:TAG]`: converted to an ACI on the fly;
   `docker://[HOST/]REPO[:TAG|@DIGEST]`: pulled from a registry, then converted.
2. `http://…`, `https://…`: downloaded, then imported like a file.
3. `sha512-HEX`: an image ID; 12 to 128 hex digits, a unique prefix (rkt prints 32, docker2aci 64).
4. an existing file, or anything that looks like a path (has a '/' prefix, './' or '../', or an
   archive suffix): an ACI file.
5. otherwise a store name, rkt's way: `NAME[:VERSION][,LABEL=VALUE...]`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kvmpod.errors import UsageError
from kvmpod.image.registry.reference import SCHEME as DOCKER_SCHEME, DockerReference, parse_docker_reference

OCI_PREFIXES = ("docker-archive:", "oci-archive:", "oci:")
MIN_ID_HEX = 12
_ID = re.compile(r"^sha512-([0-9a-f]{%d,128})$" % MIN_ID_HEX)
_ARCHIVE_SUFFIXES = (".aci", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst")
# AC Identifier (spec/types.md) without the anchors, so that `name:version` can be split off.
_AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*$")


@dataclass(frozen=True)
class FileRef:
    path: Path


@dataclass(frozen=True)
class UrlRef:
    url: str


@dataclass(frozen=True)
class OciRef:
    text: str           # given to kvmpod.image.oci.parse_reference


@dataclass(frozen=True)
class DockerRef:
    reference: DockerReference  # kvmpod/image/registry/reference.py


@dataclass(frozen=True)
class IdRef:
    hex_prefix: str     # lower-case hex digits after "sha512-"


@dataclass(frozen=True)
class NameRef:
    name: str
    labels: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return ",".join([self.name, *(f"{k}={v}" for k, v in self.labels.items())])


ImageRef = FileRef | UrlRef | OciRef | DockerRef | IdRef | NameRef


def parse_image_ref(text: str) -> ImageRef:
    if not text:
        raise UsageError("image: an empty string is not an image")
    if text.startswith(OCI_PREFIXES):
        return OciRef(text)
    if text.startswith(DOCKER_SCHEME):
        return DockerRef(parse_docker_reference(text))
    if text.startswith(("http://", "https://")):
        return UrlRef(text)
    if text.startswith("sha512-"):
        m = _ID.match(text.lower())
        if not m:
            raise UsageError(f"{text}: not an image ID (sha512- and {MIN_ID_HEX} to 128 hex digits)")
        return IdRef(m.group(1))
    if os.path.lexists(text) or text.startswith(("/", "./", "../", "~")) or text.endswith(_ARCHIVE_SUFFIXES):
        return FileRef(Path(os.path.expanduser(text)))
    return parse_name_ref(text)


def parse_name_ref(text: str) -> NameRef:
    """`NAME[:VERSION][,LABEL=VALUE...]` (the version is the label `version`)."""
    head, *label_words = text.split(",")
    labels: dict[str, str] = {}
    name, sep, version = head.rpartition(":")
    if not sep:
        name = head
    elif not version:
        raise UsageError(f"{text}: empty version after ':'")
    else:
        labels["version"] = version
    if not _AC_IDENTIFIER.match(name):
        raise UsageError(f"{text}: not an image file, ID or name ({name!r} is not an AC Identifier, "
                         "and no such file exists)")
    for word in label_words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise UsageError(f"{text}: {word!r} is not LABEL=VALUE")
        labels[key] = value
    return NameRef(name, labels)
