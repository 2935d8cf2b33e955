"""rkt's pod directory: what stage0 renders for stage1 to read, and the files stage1 writes back.

    <pod>/pod                                      the pod manifest (stage0's)
    <pod>/stage1/manifest, stage1/rootfs/          this stage1 ACI, rendered
    <pod>/stage1/rootfs/opt/stage2/<app>/manifest  each app's image manifest
    <pod>/stage1/rootfs/opt/stage2/<app>/rootfs/   each app's rootfs, rendered (a directory tree)
    <pod>/pid                                      written here: the pod's process, for `rkt enter`
    <pod>/stage1/rootfs/rkt/status/<app>           written here: the app's exit status, for `rkt status`
    <pod>/stage1/rootfs/rkt/supervisor-status      written here: -> "ready" once every app runs
    <pod>/kvmpod.json                              written here: where the kvmpod pod directory is

The pod manifest is checked as `kvmpod run --pod-manifest` checks one (kvmpod/pod/podmanifest.py),
after two adjustments for what rkt (Go's encoding/json and appc's Go types) writes: null stands for
an absent optional field, and annotation names are AC Identifiers (`coreos.com/rkt/stage1/mutable`),
which this module checks and hands over itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmpod.errors import KvmpodError
from kvmpod.fsutil import write_atomically
from kvmpod.image.manifest import ImageManifest, check_runnable, parse_manifest
from kvmpod.image.names import AC_IDENTIFIER
from kvmpod.pod.podmanifest import PodApp, PodManifest, parse_pod_manifest
from kvmpod.stage1.flags import Stage1Error

POD_MANIFEST = "pod"
STAGE1_ROOTFS = Path("stage1", "rootfs")
STAGE2 = STAGE1_ROOTFS / "opt" / "stage2"
STATUS_DIR = STAGE1_ROOTFS / "rkt" / "status"
SUPERVISOR_STATUS = STAGE1_ROOTFS / "rkt" / "supervisor-status"
RECORD = Path("kvmpod.json")   # next to `pid`, outside any overlay stage0 mounts on stage1/rootfs
PID_FILE = "pid"
MAX_MANIFEST_BYTES = 1 << 20
MUTABLE_ANNOTATION = "coreos.com/rkt/stage1/mutable"


@dataclass(frozen=True)
class RktApp:
    """One app of the pod, as stage0 rendered it."""

    pod_app: PodApp                 # the pod manifest's entry (image ID, app object, mounts...)
    manifest: ImageManifest         # stage1/rootfs/opt/stage2/<app>/manifest
    rootfs: Path                    # stage1/rootfs/opt/stage2/<app>/rootfs
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.pod_app.name


@dataclass(frozen=True)
class RktPod:
    root: Path
    uuid: str
    manifest: PodManifest
    apps: list[RktApp]
    annotations: dict[str, str] = field(default_factory=dict)   # the pod's (AC Identifiers)

    @property
    def mutable(self) -> bool:
        return self.annotations.get(MUTABLE_ANNOTATION) == "true"

    # -- what stage1 writes back ---------------------------------------------------------------

    def write_pid(self, pid: int) -> None:
        """`pid`: the process rkt hands to the enter entrypoint (the guide's first option)."""
        write_atomically(self.root / PID_FILE, str(pid).encode(), mode=0o644)

    def write_status(self, app: str, code: int) -> None:
        """`rkt/status/<app>`: the exit status `rkt status` shows (128+N for a signal N)."""
        directory = self.root / STATUS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / app, str(code).encode(), mode=0o644)

    def mark_ready(self) -> None:
        """`rkt/supervisor-status` -> ready: what `rkt status --wait-ready` waits for."""
        link = self.root / SUPERVISOR_STATUS
        tmp = link.with_name(f".{link.name}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink("ready", tmp)
        os.replace(tmp, link)

    def record(self, kvmpod_pod_dir: Path) -> None:
        write_record(self.root, kvmpod_pod_dir)


def write_record(root: Path, kvmpod_pod_dir: Path) -> None:
    """Where this pod's kvmpod pod directory is, for enter, stop and gc (whatever their environment)."""
    path = root / RECORD
    write_atomically(path, json.dumps({"pod_dir": str(kvmpod_pod_dir)}).encode(), mode=0o644)


def read_record(root: Path) -> Path | None:
    """The kvmpod pod directory recorded by run, or None when run never got that far."""
    try:
        data = json.loads((root / RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise Stage1Error(f"{root / RECORD}: unreadable: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("pod_dir"), str):
        raise Stage1Error(f"{root / RECORD}: no pod_dir in it")
    return Path(data["pod_dir"])


# -- reading what stage0 rendered ------------------------------------------------------------------

def _read_bounded(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise Stage1Error(f"{path}: {e.strerror} (stage0 writes the {what} there)") from e
    if len(data) > MAX_MANIFEST_BYTES:
        raise Stage1Error(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def _drop_nulls(obj: dict[str, Any]) -> dict[str, Any]:
    """Go writes a nil slice or pointer of a field without omitempty as null: the field is absent."""
    return {k: v for k, v in obj.items() if v is not None}


def _annotations(items: Any, where: str) -> dict[str, str]:
    """An annotation list: names are AC Identifiers (appc's Go types, what rkt writes), each once."""
    if not isinstance(items, list):
        raise Stage1Error(f"pod manifest: {where}: must be a list of name/value objects")
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not isinstance(item.get("value"), str):
            raise Stage1Error(f"pod manifest: {where}[{i}]: an annotation is an object with string name and value")
        name = item["name"]
        if not AC_IDENTIFIER.match(name):
            raise Stage1Error(f"pod manifest: {where}[{i}].name: {name!r} is not an AC Identifier")
        if name in out:
            raise Stage1Error(f"pod manifest: {where}[{i}].name: {name!r} is a duplicate annotation name")
        out[name] = item["value"]
    return out


def _normalize(obj: Any) -> tuple[dict[str, Any], dict[str, str], list[dict[str, str]]]:
    """The pod manifest without nulls and annotations, with rkt's inline app volumes (`appVolume`)
    made pod volumes; and the annotations taken out (the pod's, each app's)."""
    if not isinstance(obj, dict):
        raise Stage1Error("pod manifest: not a JSON object")
    obj = _drop_nulls(obj)
    pod_annotations = _annotations(obj.pop("annotations", []), "annotations")
    apps = obj.get("apps")
    app_annotations: list[dict[str, str]] = []
    if isinstance(apps, list):
        volumes = obj.setdefault("volumes", [])
        names = {v.get("name") for v in volumes if isinstance(v, dict)} if isinstance(volumes, list) else set()
        normalized = []
        for i, app in enumerate(apps):
            if not isinstance(app, dict):
                normalized.append(app)
                app_annotations.append({})
                continue
            app = _drop_nulls(app)
            app_annotations.append(_annotations(app.pop("annotations", []), f"apps[{i}].annotations"))
            for key in ("app", "image"):
                if isinstance(app.get(key), dict):
                    app[key] = _drop_nulls(app[key])
            mounts = []
            for mount in app.get("mounts", []) if isinstance(app.get("mounts"), list) else []:
                if isinstance(mount, dict) and isinstance(mount.get("appVolume"), dict):
                    mount = dict(mount)
                    inline = _drop_nulls(mount.pop("appVolume"))
                    if isinstance(volumes, list) and inline.get("name") not in names:
                        volumes.append(inline)
                        names.add(inline.get("name"))
                mounts.append(_drop_nulls(mount) if isinstance(mount, dict) else mount)
            if "mounts" in app:
                app["mounts"] = mounts
            normalized.append(app)
        obj["apps"] = normalized
    return obj, pod_annotations, app_annotations


def _app_rootfs(root: Path, name: str) -> Path:
    rootfs = root / STAGE2 / name / "rootfs"
    try:
        st = os.lstat(rootfs)
    except FileNotFoundError as cause:
        raise Stage1Error(f"app {name}: {rootfs}: no such directory (stage0 renders each app's rootfs there)") from cause
    except OSError as e:
        raise Stage1Error(f"app {name}: {rootfs}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):  # lstat: a symlink is refused too, it could lead anywhere on the host
        raise Stage1Error(f"app {name}: {rootfs}: not a directory")
    return rootfs


def read_pod(root: Path, uuid: str) -> RktPod:
    """The pod stage0 prepared in `root`, checked entirely before anything is started."""
    path = root / POD_MANIFEST
    data = _read_bounded(path, "pod manifest")
    try:
        raw = json.loads(data)
    except ValueError as e:
        raise Stage1Error(f"{path}: not a pod manifest: invalid JSON: {e}") from e
    try:
        obj, pod_annotations, app_annotations = _normalize(raw)
        manifest = parse_pod_manifest(json.dumps(obj).encode())
    except KvmpodError as e:
        raise Stage1Error(f"{path}: {e}") from e
    apps = []
    for pod_app, annotations in zip(manifest.apps, app_annotations):
        manifest_path = root / STAGE2 / pod_app.name / "manifest"
        try:
            image = parse_manifest(_read_bounded(manifest_path, "app's image manifest"))
            check_runnable(image)   # os/arch a kvmpod guest can run (linux/amd64)
        except Stage1Error:
            raise
        except KvmpodError as e:
            raise Stage1Error(f"{manifest_path}: {e}") from e
        apps.append(RktApp(pod_app, image, _app_rootfs(root, pod_app.name), annotations))
    return RktPod(root, uuid, manifest, apps, pod_annotations)


def with_app(rkt_app: RktApp, **changes: Any) -> RktApp:
    """The same app with its pod manifest entry changed (e.g. its app object's isolators)."""
    return dataclasses.replace(rkt_app, pod_app=dataclasses.replace(rkt_app.pod_app, **changes))
