"""The appc ImageManifest (spec/aci.md, spec 0.8.x) as typed dataclasses, and its validation.

`parse_manifest(data)` reads the bytes (size, UTF-8, JSON, nesting depth), validates them and builds
the dataclasses. Validation is two steps:

1. the JSON Schema `kvmpod/image/schema/image-manifest.schema.json` (Draft 2020-12): every field's
   type and format, required fields, and the values of the isolators spec/ace.md defines;
2. the rules a schema cannot say, in `_check_rules`: unique names in every name/value list, the
   reserved label name "name", valid os/arch label pairs, spec-defined isolators at most once and
   not together with their opposite set, a port range that ends by 65535.

`parse_manifest(data, validate=False)` skips both steps and trusts the data; the store uses it for
manifests it validated when the image was imported. jsonschema is imported only when validating,
so the run path does not pay for it.

Unknown keys are allowed at every level: the spec is meant to be extended (annotations, new
isolators, newer spec versions' fields), its reference implementation ignores unknown keys, and
kvmpod only acts on the fields it knows. They stay available in `ImageManifest.raw`.

kvmpod is stricter than spec 0.8.x in a few places, on purpose: `app.exec[0]` and event handlers'
`exec[0]` must be absolute paths (kvmpod does no PATH lookup), integers must be JSON integers
(not 1.0), and supplementary GIDs must fit a Linux gid_t. See docs/manifest.md.

Every error is one line, `manifest: <field path>: <value as JSON> <problem>`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from kvmpod.errors import ManifestError

AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*\Z")
AC_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*\Z")
AC_VERSION = "0.8.11"
MAX_MANIFEST_BYTES = 1 << 20
MAX_DEPTH = 64  # the spec's manifest nests 6 deep; this bounds recursion on hostile input

# spec/aci.md's default os/arch whitelist, with the architectures spec 0.8.7 added (CHANGELOG).
VALID_OS_ARCH: dict[str, tuple[str, ...]] = {
    "linux": ("amd64", "i386", "aarch64", "aarch64_be", "armv6l", "armv7l", "armv7b",
              "ppc64", "ppc64le", "s390x"),
    "freebsd": ("amd64", "i386", "arm"),
    "darwin": ("x86_64", "i386"),
}
RUNNABLE_OS_ARCH = ("linux", "amd64")  # what a kvmpod guest runs

# Isolators spec/ace.md defines (their value formats are in the schema). Each may be given once
# per app; a retain set and a remove set of the same kind contradict each other.
SPEC_ISOLATORS = frozenset({
    "resource/cpu", "resource/memory", "resource/block-bandwidth", "resource/block-iops",
    "resource/network-bandwidth", "os/linux/capabilities-retain-set", "os/linux/capabilities-remove-set",
    "os/linux/no-new-privileges", "os/linux/seccomp-retain-set", "os/linux/seccomp-remove-set",
    "os/linux/oom-score-adj", "os/linux/cpu-shares", "os/linux/selinux-context", "os/unix/sysctl",
})
_OPPOSITE_ISOLATORS = {
    "os/linux/capabilities-retain-set": "os/linux/capabilities-remove-set",
    "os/linux/capabilities-remove-set": "os/linux/capabilities-retain-set",
    "os/linux/seccomp-retain-set": "os/linux/seccomp-remove-set",
    "os/linux/seccomp-remove-set": "os/linux/seccomp-retain-set",
}


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str


@dataclass(frozen=True)
class Isolator:
    name: str
    value: Any


@dataclass(frozen=True)
class MountPoint:
    name: str
    path: str
    read_only: bool = False


@dataclass(frozen=True)
class Port:
    name: str
    protocol: str
    port: int
    count: int = 1
    socket_activated: bool = False


@dataclass(frozen=True)
class App:
    exec: list[str]
    user: str
    group: str
    working_directory: str = "/"
    environment: list[EnvVar] = field(default_factory=list)
    supplementary_gids: list[int] = field(default_factory=list)
    event_handlers: dict[str, list[str]] = field(default_factory=dict)  # "pre-start"/"post-stop" -> exec
    isolators: list[Isolator] = field(default_factory=list)
    mount_points: list[MountPoint] = field(default_factory=list)
    ports: list[Port] = field(default_factory=list)


@dataclass(frozen=True)
class Dependency:
    image_name: str
    image_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    size: int | None = None


@dataclass(frozen=True)
class ImageManifest:
    name: str
    labels: dict[str, str]
    app: App | None
    raw: dict[str, Any]
    annotations: dict[str, str] = field(default_factory=dict)
    dependencies: list[Dependency] = field(default_factory=list)
    path_whitelist: list[str] = field(default_factory=list)

    @property
    def display_name(self) -> str:
        version = self.labels.get("version")
        return f"{self.name}:{version}" if version else self.name


# ---- error lines -------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*\Z")
_MAX_SHOWN = 60  # a bad value can be up to 1 MiB; the line stays readable
_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
               "array": "a list", "object": "an object", "null": "null"}


def _path(parts: Any) -> str:
    """["app", "ports", 1, "name"] -> "app.ports[1].name"; odd keys are quoted: value["net.core.x"]."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _show(value: Any) -> str:
    # ASCII-only JSON: no newlines or terminal control characters from the image reach the user.
    text = json.dumps(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


def _fail(path: str, value: Any, problem: str) -> ManifestError:
    return ManifestError(f"manifest: {path}: {_show(value)} {problem}")


def _schema_error_line(error: Any) -> ManifestError:
    """One jsonschema ValidationError as kvmpod's one-line ManifestError."""
    parts = list(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    keyword = error.validator
    if keyword == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        return ManifestError(f"manifest: {_path([*parts, missing])}: required field is missing")
    path = _path(parts)
    if keyword == "not":  # {"not": {}}: the field must be absent
        return _fail(path, error.instance, "is not allowed here")
    if keyword == "type":
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return _fail(path, error.instance, "is not " + " or ".join(_TYPE_NAMES[t] for t in types))
    if "$comment" in schema:  # the subschema names what its values are, e.g. "an AC Name"
        return _fail(path, error.instance, f"is not {schema['$comment']}")
    if keyword == "const":
        return _fail(path, error.instance, f"is not {_show(error.validator_value)}")
    if keyword == "enum":
        return _fail(path, error.instance, "is not one of " + ", ".join(map(_show, error.validator_value)))
    if keyword in ("minimum", "maximum"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if keyword == "minimum" and low == 0:
            return _fail(path, error.instance, "is not a non-negative integer")
        if low is not None and high is not None:
            return _fail(path, error.instance, f"is not between {low} and {high}")
        return _fail(path, error.instance, f"is less than {low}" if keyword == "minimum" else f"is more than {high}")
    if keyword == "minItems":
        return _fail(path, error.instance, "is an empty list")
    if keyword == "minLength":
        return _fail(path, error.instance, "is an empty string")
    return _fail(path, error.instance, f"fails the schema's {keyword!r} rule")  # a keyword added later


# ---- schema validation (jsonschema is imported here, not at module import) ---------------------

@functools.cache
def _schema() -> dict[str, Any]:
    text = resources.files("kvmpod.image").joinpath("schema/image-manifest.schema.json").read_text("utf-8")
    return json.loads(text)


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    # JSON Schema patterns are ECMA-262, where "$" matches only at the very end; Python's "$" also
    # matches before a final "\n", which would let "name\n" pass as an AC Name.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import ValidationError

    def pattern(validator: Any, patrn: str, instance: Any, schema: dict) -> Any:
        if validator.is_type(instance, "string") and not _regex(patrn).search(instance):
            yield ValidationError(f"{instance!r} does not match {patrn!r}")

    # The spec's integers are integers: 1.0 is not a port (Go's encoding/json refuses it too).
    types = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool))
    cls = validators.extend(Draft202012Validator, validators={"pattern": pattern}, type_checker=types)
    return cls(_schema())


def _validate_schema(obj: dict[str, Any]) -> None:
    # The schema has no anyOf/oneOf, so every error already sits at the field it is about. Of all
    # errors, report the one highest up (a missing or mistyped parent before its children), first
    # in schema order among equals: deterministic, unlike best_match's documented heuristic.
    best = min(_validator().iter_errors(obj), key=lambda e: len(e.absolute_path), default=None)
    if best is not None:
        raise _schema_error_line(best)


# ---- rules a schema cannot say -----------------------------------------------------------------

def _check_unique(items: list[dict[str, Any]], path: str, what: str) -> dict[str, int]:
    """Index of each item's "name"; raises on the first repeated name."""
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        name = item["name"]
        if name in seen:
            raise _fail(f"{path}[{i}].name", name, f"is a duplicate {what} name")
        seen[name] = i
    return seen


def _check_labels(labels: list[dict[str, str]], path: str) -> None:
    for i, label in enumerate(labels):
        if label["name"] == "name":  # spec: it would be confused with the image name
            raise _fail(f"{path}[{i}].name", "name", "is a reserved label name")
    seen = _check_unique(labels, path, "label")
    if "os" not in seen:
        return  # spec: arch is meaningful only with os
    os_ = labels[seen["os"]]["value"]
    if os_ not in VALID_OS_ARCH:
        raise _fail(f"{path}[{seen['os']}].value", os_, f"is not a known os ({', '.join(sorted(VALID_OS_ARCH))})")
    if "arch" in seen:
        arch = labels[seen["arch"]]["value"]
        if arch not in VALID_OS_ARCH[os_]:
            raise _fail(f"{path}[{seen['arch']}].value", arch,
                        f"is not an arch of os {_show(os_)} ({', '.join(VALID_OS_ARCH[os_])})")


def _check_isolators(isolators: list[dict[str, Any]]) -> None:
    first: dict[str, int] = {}
    for i, iso in enumerate(isolators):
        name = iso["name"]
        if name not in SPEC_ISOLATORS:
            continue
        if name in first:
            raise _fail(f"app.isolators[{i}].name", name, f"is given twice (also app.isolators[{first[name]}])")
        opposite = _OPPOSITE_ISOLATORS.get(name)
        if opposite in first:
            raise _fail(f"app.isolators[{i}].name", name,
                        f"cannot be used with {_show(opposite)} (app.isolators[{first[opposite]}])")
        first[name] = i


def _check_rules(obj: dict[str, Any]) -> None:
    _check_labels(obj.get("labels", []), "labels")
    _check_unique(obj.get("annotations", []), "annotations", "annotation")
    for i, dep in enumerate(obj.get("dependencies", [])):
        _check_labels(dep.get("labels", []), f"dependencies[{i}].labels")
    app = obj.get("app")
    if app is None:
        return
    _check_unique(app.get("environment", []), "app.environment", "environment variable")
    _check_unique(app.get("eventHandlers", []), "app.eventHandlers", "event handler")
    _check_unique(app.get("mountPoints", []), "app.mountPoints", "mount point")
    _check_unique(app.get("ports", []), "app.ports", "port")
    for i, port in enumerate(app.get("ports", [])):
        count = port.get("count", 1)
        if port["port"] + count - 1 > 65535:
            raise _fail(f"app.ports[{i}].count", count, f"ports from {port['port']} end past 65535")
    _check_isolators(app.get("isolators", []))


# ---- bytes -> dataclasses ----------------------------------------------------------------------

def _too_deep(obj: Any) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"manifest: invalid JSON: {name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # Python reads 1e999 as inf, which no manifest field can mean
        raise ManifestError(f"manifest: invalid JSON: number {text[:20]} is out of range")
    return value


def _pairs(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {item["name"]: item["value"] for item in items or []}


def _build_app(app: dict[str, Any]) -> App:
    return App(
        exec=list(app.get("exec") or []),
        user=app["user"],
        group=app["group"],
        working_directory=app.get("workingDirectory") or "/",
        environment=[EnvVar(e["name"], e["value"]) for e in app.get("environment", [])],
        supplementary_gids=list(app.get("supplementaryGIDs", [])),
        event_handlers={h["name"]: list(h["exec"]) for h in app.get("eventHandlers", [])},
        isolators=[Isolator(i["name"], i["value"]) for i in app.get("isolators", [])],
        mount_points=[MountPoint(m["name"], m["path"], m.get("readOnly", False)) for m in app.get("mountPoints", [])],
        ports=[Port(p["name"], p["protocol"], p["port"], p.get("count", 1), p.get("socketActivated", False))
               for p in app.get("ports", [])],
    )


def _build(obj: dict[str, Any]) -> ImageManifest:
    app = obj.get("app")
    return ImageManifest(
        name=obj["name"],
        labels=_pairs(obj.get("labels")),
        app=_build_app(app) if app is not None else None,
        raw=obj,
        annotations=_pairs(obj.get("annotations")),
        dependencies=[Dependency(d["imageName"], d.get("imageID"), _pairs(d.get("labels")), d.get("size"))
                      for d in obj.get("dependencies", [])],
        path_whitelist=list(obj.get("pathWhitelist", [])),
    )


def parse_manifest(data: bytes, validate: bool = True) -> ImageManifest:
    """Parse an ImageManifest; with validate=False the data is trusted (already validated by the store)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest: {len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise ManifestError("manifest: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise ManifestError("manifest: invalid JSON: a number has too many digits") from None
    except RecursionError:
        raise ManifestError(f"manifest: nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(obj, dict):
        raise ManifestError("manifest: top level is not a JSON object")
    if validate:
        if _too_deep(obj):
            raise ManifestError(f"manifest: nested deeper than {MAX_DEPTH} levels")
        _validate_schema(obj)
        _check_rules(obj)
        return _build(obj)
    try:
        return _build(obj)
    except (KeyError, TypeError, AttributeError):  # a stored manifest changed behind the store's back
        raise ManifestError("manifest: the stored manifest is malformed; re-import the image") from None


def check_runnable(manifest: ImageManifest) -> None:
    """Refuse an image whose os/arch labels say a kvmpod guest (linux/amd64) cannot run it.

    A missing label means the image does not depend on it (spec/aci.md), so it passes.
    """
    for label, runnable in zip(("os", "arch"), RUNNABLE_OS_ARCH):
        value = manifest.labels.get(label)
        if value is not None and value != runnable:
            raise ManifestError(f"manifest: labels: {label} {_show(value)} cannot run in a kvmpod VM "
                                f"(it runs {'/'.join(RUNNABLE_OS_ARCH)} images)")


def build_manifest(name: str, *, exec_: list[str], user: str = "0", group: str = "0",
                   working_directory: str | None = None, environment: dict[str, str] | None = None,
                   labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
                   ports: list[Port] | None = None, mount_points: list[MountPoint] | None = None,
                   isolators: list[Isolator] | None = None) -> dict:
    """An ImageManifest dict for linux/amd64, validated by parse_manifest before it is returned."""
    all_labels = {"os": "linux", "arch": "amd64", **(labels or {})}
    app: dict[str, Any] = {"exec": exec_, "user": user, "group": group}
    if working_directory:
        app["workingDirectory"] = working_directory
    if environment:
        app["environment"] = [{"name": k, "value": v} for k, v in environment.items()]
    if isolators:
        app["isolators"] = [{"name": i.name, "value": i.value} for i in isolators]
    if mount_points:
        app["mountPoints"] = [{"name": m.name, "path": m.path, "readOnly": m.read_only} for m in mount_points]
    if ports:
        app["ports"] = [{"name": p.name, "protocol": p.protocol, "port": p.port, "count": p.count,
                         "socketActivated": p.socket_activated} for p in ports]
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
