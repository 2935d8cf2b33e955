"""The appc ImageManifest (spec/aci.md, spec 0.8.x) as typed dataclasses, and its validation.

`parse_manifest(data)` reads the bytes (size, UTF-8, JSON, nesting depth), validates them and builds
the dataclasses. Validation is two steps:

1. the JSON Schema `kvmpod/image/schema/image-manifest.schema.json` (Draft 2020-12): every field's
   type and format, required fields, and the values of the isolators spec/ace.md defines (checked
   by kvmpod/schema.py, which the pod manifest shares);
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

import json
from dataclasses import dataclass, field
from typing import Any

from kvmpod import schema
from kvmpod.errors import ManifestError
from kvmpod.schema import SchemaFile

AC_VERSION = "0.8.11"
MAX_MANIFEST_BYTES = 1 << 20

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


# ---- schema validation (kvmpod/schema.py: loading, the validator, one-line errors) -------------

IMAGE_SCHEMA = SchemaFile("manifest", "kvmpod.image", "image-manifest.schema.json")
_fail = IMAGE_SCHEMA.fail
_show, _regex = schema.show, schema.regex


def _schema() -> dict[str, Any]:
    return IMAGE_SCHEMA.schema()


# ---- rules a schema cannot say -----------------------------------------------------------------

def _check_labels(labels: list[dict[str, str]], path: str) -> None:
    for i, label in enumerate(labels):
        if label["name"] == "name":  # spec: it would be confused with the image name
            raise _fail(f"{path}[{i}].name", "name", "is a reserved label name")
    seen = IMAGE_SCHEMA.check_unique(labels, path, "label")
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


def check_isolators(isolators: list[dict[str, Any]], where: str, doc: SchemaFile = IMAGE_SCHEMA) -> None:
    """Spec-defined isolators at most once each, never with their opposite set (`where`: "app.isolators")."""
    first: dict[str, int] = {}
    for i, iso in enumerate(isolators):
        name = iso["name"]
        if name not in SPEC_ISOLATORS:
            continue
        if name in first:
            raise doc.fail(f"{where}[{i}].name", name, f"is given twice (also {where}[{first[name]}])")
        opposite = _OPPOSITE_ISOLATORS.get(name)
        if opposite in first:
            raise doc.fail(f"{where}[{i}].name", name,
                           f"cannot be used with {_show(opposite)} ({where}[{first[opposite]}])")
        first[name] = i


def check_app_rules(app: dict[str, Any], where: str = "app", doc: SchemaFile = IMAGE_SCHEMA) -> None:
    """The rules beyond the schema for an `app` object (an image's, or a pod manifest app's replacement)."""
    doc.check_unique(app.get("environment", []), f"{where}.environment", "environment variable")
    doc.check_unique(app.get("eventHandlers", []), f"{where}.eventHandlers", "event handler")
    doc.check_unique(app.get("mountPoints", []), f"{where}.mountPoints", "mount point")
    doc.check_unique(app.get("ports", []), f"{where}.ports", "port")
    for i, port in enumerate(app.get("ports", [])):
        count = port.get("count", 1)
        if port["port"] + count - 1 > 65535:
            raise doc.fail(f"{where}.ports[{i}].count", count, f"ports from {port['port']} end past 65535")
    check_isolators(app.get("isolators", []), f"{where}.isolators", doc)


def _check_rules(obj: dict[str, Any]) -> None:
    _check_labels(obj.get("labels", []), "labels")
    IMAGE_SCHEMA.check_unique(obj.get("annotations", []), "annotations", "annotation")
    for i, dep in enumerate(obj.get("dependencies", [])):
        _check_labels(dep.get("labels", []), f"dependencies[{i}].labels")
    if obj.get("app") is not None:
        check_app_rules(obj["app"])


# ---- bytes -> dataclasses ----------------------------------------------------------------------

def _pairs(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {item["name"]: item["value"] for item in items or []}


def build_app(app: dict[str, Any]) -> App:
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
        app=build_app(app) if app is not None else None,
        raw=obj,
        annotations=_pairs(obj.get("annotations")),
        dependencies=[Dependency(d["imageName"], d.get("imageID"), _pairs(d.get("labels")), d.get("size"))
                      for d in obj.get("dependencies", [])],
        path_whitelist=list(obj.get("pathWhitelist", [])),
    )


def parse_manifest(data: bytes, validate: bool = True) -> ImageManifest:
    """Parse an ImageManifest; with validate=False the data is trusted (already validated by the store)."""
    obj = IMAGE_SCHEMA.read_json(data, MAX_MANIFEST_BYTES)
    if validate:
        IMAGE_SCHEMA.check_depth(obj)
        IMAGE_SCHEMA.validate(obj)
        _check_rules(obj)
        return _build(obj)
    try:
        return _build(obj)
    except (KeyError, TypeError, AttributeError) as e:  # a stored manifest changed behind the store's back
        raise ManifestError("manifest: the stored manifest is malformed; re-import the image") from e


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
