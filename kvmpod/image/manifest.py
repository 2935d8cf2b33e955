"""The appc ImageManifest (spec/aci.md) as typed dataclasses.

This module checks what the run path relies on; the full JSON-Schema validation of every
field is the images issue's (docs/images.md). Every error names the field path and value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from kvmpod.errors import ManifestError

AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*$")
AC_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
AC_VERSION = "0.8.11"
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str


@dataclass(frozen=True)
class App:
    exec: list[str]
    user: str
    group: str
    working_directory: str = "/"
    environment: list[EnvVar] = field(default_factory=list)
    supplementary_gids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ImageManifest:
    name: str
    labels: dict[str, str]
    app: App | None
    raw: dict[str, Any]

    @property
    def display_name(self) -> str:
        version = self.labels.get("version")
        return f"{self.name}:{version}" if version else self.name


def _fail(path: str, value: Any, problem: str) -> ManifestError:
    return ManifestError(f"manifest: {path}: {json.dumps(value)} {problem}")


def _expect(obj: dict, key: str, kind: type, path: str, required: bool = True) -> Any:
    if key not in obj:
        if required:
            raise ManifestError(f"manifest: {path}{key}: required field is missing")
        return None
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(path + key, value, f"is not {'an' if kind in (int, object) else 'a'} {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {str: "string", list: "list", dict: "object", int: "integer", bool: "boolean"}


def _parse_app(obj: Any) -> App:
    if not isinstance(obj, dict):
        raise _fail("app", obj, "is not an object")
    exec_ = _expect(obj, "exec", list, "app.", required=False) or []
    for i, arg in enumerate(exec_):
        if not isinstance(arg, str):
            raise _fail(f"app.exec[{i}]", arg, "is not a string")
    if exec_ and not exec_[0].startswith("/"):
        raise _fail("app.exec[0]", exec_[0], "is not an absolute path")
    user = _expect(obj, "user", str, "app.")
    group = _expect(obj, "group", str, "app.")
    workdir = _expect(obj, "workingDirectory", str, "app.", required=False) or "/"
    if not workdir.startswith("/"):
        raise _fail("app.workingDirectory", workdir, "is not an absolute path")
    env = []
    for i, item in enumerate(_expect(obj, "environment", list, "app.", required=False) or []):
        if not isinstance(item, dict):
            raise _fail(f"app.environment[{i}]", item, "is not an object")
        env.append(EnvVar(_expect(item, "name", str, f"app.environment[{i}]."),
                          _expect(item, "value", str, f"app.environment[{i}].")))
    gids = _expect(obj, "supplementaryGIDs", list, "app.", required=False) or []
    for i, gid in enumerate(gids):
        if not isinstance(gid, int) or isinstance(gid, bool) or gid < 0:
            raise _fail(f"app.supplementaryGIDs[{i}]", gid, "is not a non-negative integer")
    return App(list(exec_), user, group, workdir, env, list(gids))


def parse_manifest(data: bytes) -> ImageManifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest: {len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError("manifest: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ManifestError("manifest: top level is not a JSON object")
    kind = _expect(obj, "acKind", str, "")
    if kind != "ImageManifest":
        raise _fail("acKind", kind, 'is not "ImageManifest"')
    _expect(obj, "acVersion", str, "")
    name = _expect(obj, "name", str, "")
    if not AC_IDENTIFIER.match(name):
        raise _fail("name", name, "is not an AC Identifier")
    labels: dict[str, str] = {}
    for i, label in enumerate(_expect(obj, "labels", list, "", required=False) or []):
        if not isinstance(label, dict):
            raise _fail(f"labels[{i}]", label, "is not an object")
        lname = _expect(label, "name", str, f"labels[{i}].")
        if lname in labels or lname == "name":
            raise _fail(f"labels[{i}].name", lname, "is a duplicate or reserved label name")
        labels[lname] = _expect(label, "value", str, f"labels[{i}].")
    app = _parse_app(obj["app"]) if obj.get("app") is not None else None
    return ImageManifest(name, labels, app, obj)


def build_manifest(name: str, *, exec_: list[str], user: str = "0", group: str = "0",
                   working_directory: str | None = None, environment: dict[str, str] | None = None,
                   labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> dict:
    """An ImageManifest dict, checked by parse_manifest before it is returned."""
    all_labels = {"os": "linux", "arch": "amd64", **(labels or {})}
    app: dict[str, Any] = {"exec": exec_, "user": user, "group": group}
    if working_directory:
        app["workingDirectory"] = working_directory
    if environment:
        app["environment"] = [{"name": k, "value": v} for k, v in environment.items()]
    manifest: dict[str, Any] = {
        "acKind": "ImageManifest",
        "acVersion": AC_VERSION,
        "name": name,
        "labels": [{"name": k, "value": v} for k, v in all_labels.items()],
        "app": app,
    }
    if annotations:
        manifest["annotations"] = [{"name": k, "value": v} for k, v in annotations.items()]
    parse_manifest(json.dumps(manifest).encode())
    return manifest
