"""Registry credentials and authentication challenges.

Credentials come from the files podman, skopeo, buildah and docker use, first match wins
(containers-auth.json(5)):

    $REGISTRY_AUTH_FILE, else ${XDG_RUNTIME_DIR}/containers/auth.json (/run/containers/<uid>/auth.json)
    ~/.config/containers/auth.json
    $DOCKER_CONFIG/config.json, else ~/.docker/config.json

Each has `{"auths": {KEY: {"auth": base64("user:password")}}}`. A KEY is a registry host, or a host
and a repository prefix (`registry.example.com/team`); the longest that matches the image wins.
Docker's legacy keys (`https://index.docker.io/v1/`) are matched without their scheme and path.
Credential helpers (`credsStore`, `credHelpers`) and identity tokens are not run or used.

A registry that wants authentication answers 401 with `WWW-Authenticate`: `Basic realm=...` (send
the credentials) or `Bearer realm=URL,service=...,scope=...` (Docker's token auth: get a token from
the realm, with the credentials if there are any, and send it instead).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kvmpod.errors import ImageError
from kvmpod.image.registry.reference import DOCKER_HUB, DockerReference

_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    origin: Path  # the file they came from, for messages

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class Challenge:
    scheme: str                 # "bearer" or "basic", lower case
    params: dict[str, str]      # realm, service, scope, ... (lower-case keys)


def auth_files() -> list[Path]:
    """The credential files to look in, in order (whether they exist or not)."""
    files: list[Path] = []
    if explicit := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(explicit))
    elif runtime := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(runtime, "containers", "auth.json"))
    else:
        files.append(Path(f"/run/containers/{os.getuid()}/auth.json"))
    home = Path.home()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    files.append(config_home / "containers" / "auth.json")
    files.append(Path(os.environ.get("DOCKER_CONFIG") or home / ".docker") / "config.json")
    return files


def find_credentials(ref: DockerReference, files: list[Path] | None = None) -> Credentials | None:
    """The credentials for `ref`'s registry (and repository) from the first file that has some."""
    for path in auth_files() if files is None else files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ImageError(f"{path}: cannot read registry credentials: {e.strerror}") from e
        if found := _credentials_in(path, data, ref):
            return found
    return None


def _normal_key(key: str) -> str:
    key = key.removeprefix("https://").removeprefix("http://")
    for suffix in ("/v1/", "/v2/", "/v1", "/v2"):
        key = key.removesuffix(suffix)
    key = key.rstrip("/")
    host, slash, rest = key.partition("/")
    if host in _HUB_ALIASES:
        host = DOCKER_HUB
    return host + slash + rest


def _credentials_in(path: Path, data: bytes, ref: DockerReference) -> Credentials | None:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImageError(f"{path}: registry credentials file is not valid JSON: {e}") from e
    auths = document.get("auths") if isinstance(document, dict) else None
    if auths is None:
        return None
    if not isinstance(auths, dict):
        raise ImageError(f"{path}: \"auths\" is not an object")
    wanted = [ref.host + "/" + "/".join(ref.repository.split("/")[:n])
              for n in range(ref.repository.count("/") + 1, 0, -1)] + [ref.host]
    entries = {_normal_key(k): v for k, v in auths.items() if isinstance(k, str)}
    for key in wanted:
        entry = entries.get(key)
        if not isinstance(entry, dict) or not entry.get("auth"):
            continue
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as e:
            raise ImageError(f"{path}: auths[{key!r}].auth is not base64 of user:password") from e
        username, colon, password = decoded.partition(":")
        if not colon or not username:
            raise ImageError(f"{path}: auths[{key!r}].auth is not base64 of user:password")
        return Credentials(username, password, path)
    return None


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """The challenges of `WWW-Authenticate` headers (quoted values may hold commas)."""
    found: list[Challenge] = []
    for header in headers:
        scheme, _, rest = header.strip().partition(" ")
        if not scheme:
            continue
        params: dict[str, str] = {}
        for item in urllib.request.parse_http_list(rest):  # splits at commas outside quotes
            key, eq, value = item.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"')
            if eq:
                params[key.strip().lower()] = value
        found.append(Challenge(scheme.lower(), params))
    return found
