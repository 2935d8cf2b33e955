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
`resource/memory`/`resource/cpu` isolators bound the apps' limits. Volumes, mounts and ports are
refused until kvmpod has volumes and port forwarding: running without them would be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmpod.errors import UsageError
from kvmpod.image.manifest import IMAGE_SCHEMA, App, Isolator, build_app, check_app_rules, check_isolators
from kvmpod.pod.spec import AppOverrides
from kvmpod.schema import SchemaFile

POD_SCHEMA = SchemaFile("pod manifest", "kvmpod.pod", "pod-manifest.schema.json", uses=(IMAGE_SCHEMA,))
MAX_POD_MANIFEST_BYTES = 1 << 20
# what kvmpod cannot do yet, and why it is refused rather than skipped
_UNSUPPORTED = {"volumes": "volumes are not supported yet", "mounts": "volumes are not supported yet",
                "ports": "port forwarding is not supported yet"}


@dataclass(frozen=True)
class PodApp:
    name: str
    image_id: str                   # "sha512-" and 12 to 128 hex digits: a unique prefix in the store
    image_name: str | None = None
    image_labels: dict[str, str] = field(default_factory=dict)
    app: App | None = None          # replaces the image's app
    readonly_rootfs: bool = False
    annotations: dict[str, str] = field(default_factory=dict)

    def overrides(self) -> AppOverrides:
        return AppOverrides(image=self.image_id, name=self.name, readonly_rootfs=self.readonly_rootfs, app=self.app,
                            image_name=self.image_name, image_labels=dict(self.image_labels),
                            annotations=dict(self.annotations))


@dataclass(frozen=True)
class PodManifest:
    apps: list[PodApp]
    isolators: list[Isolator] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)

    def app_overrides(self) -> list[AppOverrides]:
        """The apps as the run path takes them (kvmpod/pod/run.py, prepare_apps)."""
        return [app.overrides() for app in self.apps]


def read_pod_manifest(path: Path) -> PodManifest:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_POD_MANIFEST_BYTES + 1)
    except OSError as e:
        raise UsageError(f"--pod-manifest: {path}: {e.strerror}") from None
    return parse_pod_manifest(data)


def parse_pod_manifest(data: bytes) -> PodManifest:
    obj = POD_SCHEMA.read_json(data, MAX_POD_MANIFEST_BYTES)
    POD_SCHEMA.check_depth(obj)
    POD_SCHEMA.validate(obj)
    _check_rules(obj)
    return PodManifest(
        apps=[_build_app(app) for app in obj["apps"]],
        isolators=[Isolator(i["name"], i["value"]) for i in obj.get("isolators", [])],
        annotations=_pairs(obj.get("annotations")),
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
    # after the shape checks, so a malformed entry is reported as such first
    for key in ("volumes", "ports"):
        if obj.get(key):
            raise POD_SCHEMA.fail(key, obj[key], f"is refused: {_UNSUPPORTED[key]}")
    for i, app in enumerate(apps):
        if app.get("mounts"):
            raise POD_SCHEMA.fail(f"apps[{i}].mounts", app["mounts"], f"is refused: {_UNSUPPORTED['mounts']}")


def _pairs(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {item["name"]: item["value"] for item in items or []}


def _build_app(app: dict[str, Any]) -> PodApp:
    image = app["image"]
    return PodApp(
        name=app["name"],
        image_id=image["id"],
        image_name=image.get("name"),
        image_labels=_pairs(image.get("labels")),
        app=build_app(app["app"]) if app.get("app") is not None else None,
        readonly_rootfs=app.get("readOnlyRootFS", False),
        annotations=_pairs(app.get("annotations")),
    )
