"""`kvmpod run --pod-manifest FILE`: a complete appc PodManifest (spec/pods.md) as the pod to run.

The file is checked like an image manifest (kvmpod/schema.py): the JSON Schema
`kvmpod/pod/schema/pod-manifest.schema.json`, whose apps' `app` objects are the image manifest
schema's own definition, then the rules a schema cannot say: unique app names, unique annotation
names (the pod's and each app's), the `app` object's own rules (kvmpod/image/manifest.py,
check_app_rules). Errors are one line, `pod manifest: <field path>: <value> <problem>`.

What it means (docs/executor.md, "Pod manifests"): each app's image is looked up in the store by
`image.id` (any unique prefix; nothing is imported) and must have the `image.name` and
`image.labels` given; `app` replaces the image's app whole; `readOnlyRootFS` and per-app
`annotations` apply; the pod's `annotations` are the pod annotations and its
`resource/memory`/`resource/cpu` isolators bound the apps' limits; `volumes` and `apps[].mounts`
are the pod's volumes and each app's explicit mounts (docs/volumes.md); `ports` are forwarded like
`--port` (docs/networking.md).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmpod.errors import UsageError
from kvmpod.image.manifest import IMAGE_SCHEMA, App, Isolator, build_app, check_app_rules, check_isolators
from kvmpod.net.spec import PortRequest
from kvmpod.pod.spec import AppOverrides
from kvmpod.pod.volumes import Mount, Volume, make_mount, make_volume, unique_volumes
from kvmpod.schema import SchemaFile

POD_SCHEMA = SchemaFile("pod manifest", "kvmpod.pod", "pod-manifest.schema.json", uses=(IMAGE_SCHEMA,))
MAX_POD_MANIFEST_BYTES = 1 << 20
# what kvmpod cannot do yet, and why it is refused rather than skipped


@dataclass(frozen=True)
class PodApp:
    name: str
    image_id: str                   # "sha512-" and 12 to 128 hex digits: a unique prefix in the store
    image_name: str | None = None
    image_labels: dict[str, str] = field(default_factory=dict)
    app: App | None = None          # replaces the image's app
    readonly_rootfs: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)

    def overrides(self) -> AppOverrides:
        return AppOverrides(image=self.image_id, name=self.name, readonly_rootfs=self.readonly_rootfs, app=self.app,
                            image_name=self.image_name, image_labels=dict(self.image_labels),
                            annotations=dict(self.annotations), mounts=list(self.mounts))


@dataclass(frozen=True)
class PodManifest:
    apps: list[PodApp]
    isolators: list[Isolator] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    volumes: list[Volume] = field(default_factory=list)
    ports: list[PortRequest] = field(default_factory=list)   # exposed ports: like --port NAME:[HOSTIP:]HOSTPORT

    def app_overrides(self) -> list[AppOverrides]:
        """The apps as the run path takes them (kvmpod/pod/run.py, prepare_apps)."""
        return [app.overrides() for app in self.apps]


def read_pod_manifest(path: Path) -> PodManifest:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_POD_MANIFEST_BYTES + 1)
    except OSError as e:
        raise UsageError(f"--pod-manifest: {path}: {e.strerror}") from e
    return parse_pod_manifest(data)


def parse_pod_manifest(data: bytes) -> PodManifest:
    obj = POD_SCHEMA.read_json(data, MAX_POD_MANIFEST_BYTES)
    POD_SCHEMA.check_depth(obj)
    POD_SCHEMA.validate(obj)
    _check_rules(obj)
    volumes = [_build_volume(i, v) for i, v in enumerate(obj.get("volumes") or [])]
    unique_volumes(volumes, "pod manifest: volumes")
    return PodManifest(
        volumes=volumes,
        apps=[_build_app(app, i) for i, app in enumerate(obj["apps"])],
        isolators=[Isolator(i["name"], i["value"]) for i in obj.get("isolators", [])],
        annotations=_pairs(obj.get("annotations")),
        ports=[PortRequest(p["name"], p["hostPort"], p.get("hostIP", "")) for p in obj.get("ports", [])],
    )


def _check_rules(obj: dict[str, Any]) -> None:
    apps = obj["apps"]
    POD_SCHEMA.check_unique(apps, "apps", "app")
    POD_SCHEMA.check_unique(obj.get("annotations", []), "annotations", "annotation")
    check_isolators(obj.get("isolators", []), "isolators", POD_SCHEMA)
    for i, app in enumerate(apps):
        POD_SCHEMA.check_unique(app.get("annotations", []), f"apps[{i}].annotations", "annotation")
        if app.get("app") is not None:
            check_app_rules(app["app"], f"apps[{i}].app", POD_SCHEMA)
    POD_SCHEMA.check_unique(obj.get("ports", []), "ports", "port")
    for i, port in enumerate(obj.get("ports", [])):
        if "hostIP" in port:
            try:
                ipaddress.IPv4Address(port["hostIP"])
            except ValueError as e:
                raise POD_SCHEMA.fail(f"ports[{i}].hostIP", port["hostIP"], "is not an IPv4 address") from e


def _pairs(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {item["name"]: item["value"] for item in items or []}


def _build_volume(i: int, v: Any) -> Volume:
    where = f"pod manifest: volumes[{i}]"
    if not isinstance(v, dict) or not isinstance(v.get("name"), str):
        raise UsageError(f"{where}: a volume is an object with a name")
    fields = {k: val for k, val in v.items() if k != "name"}
    if fields.get("mode") is not None and not isinstance(fields["mode"], str):
        raise UsageError(f"{where}: mode must be an octal string like \"0755\"")
    for key in ("uid", "gid"):
        if key in fields and (not isinstance(fields[key], int) or isinstance(fields[key], bool)):
            raise UsageError(f"{where}: {key} must be an integer")
    if "readOnly" in fields and not isinstance(fields["readOnly"], bool):
        raise UsageError(f"{where}: readOnly must be true or false")
    return make_volume(where, v["name"], fields)


def _build_mounts(i: int, mounts: Any) -> list[Mount]:
    out = []
    for j, m in enumerate(mounts or []):
        where = f"pod manifest: apps[{i}].mounts[{j}]"
        if not isinstance(m, dict) or not isinstance(m.get("volume"), str) or not isinstance(m.get("path"), str):
            raise UsageError(f"{where}: a mount is an object with volume and path")
        out.append(make_mount(where, m["volume"], m["path"]))
    return out


def _build_app(app: dict[str, Any], i: int = 0) -> PodApp:
    image = app["image"]
    return PodApp(
        name=app["name"],
        image_id=image["id"],
        image_name=image.get("name"),
        image_labels=_pairs(image.get("labels")),
        app=build_app(app["app"]) if app.get("app") is not None else None,
        readonly_rootfs=app.get("readOnlyRootFS", False),
        annotations=_pairs(app.get("annotations")),
        mounts=_build_mounts(i, app.get("mounts")),
    )
