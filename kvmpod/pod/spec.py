"""From images and command-line overrides to the exact process each app runs (appc executor rules)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kvmpod.errors import UsageError
from kvmpod.image.manifest import AC_NAME, AC_VERSION, ImageManifest
from kvmpod.store import StoredImage

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # spec/ace.md


@dataclass
class AppOverrides:
    """What the user asked for one app on the command line (rkt's per-app flags)."""

    image: str
    exec: str | None = None
    args: list[str] | None = None           # after `--`: replace the image's arguments
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    group: str | None = None
    working_dir: str | None = None
    name: str | None = None
    readonly_rootfs: bool = False


@dataclass(frozen=True)
class ResolvedApp:
    name: str
    image: StoredImage
    disk: Path              # the image's rootfs disk on the host
    disk_serial: str        # how the guest finds that disk
    argv: list[str]
    env: list[str]
    working_dir: str
    user: str
    group: str
    supplementary_gids: list[int]
    readonly_rootfs: bool


def default_app_name(manifest: ImageManifest) -> str:
    """rkt's rule: the last component of the image name, made a valid AC Name."""
    base = manifest.name.rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9]+", "-", base).strip("-")
    return name or "app"


def app_environment(app_name: str, image_env: list[tuple[str, str]], pod_env: dict[str, str],
                    app_env: dict[str, str]) -> list[str]:
    """The executor's environment: PATH default, AC_APP_NAME, container, then image, pod and app values."""
    env: dict[str, str] = {}
    names = {n for n, _ in image_env} | set(pod_env) | set(app_env)
    if "PATH" not in names:
        env["PATH"] = DEFAULT_PATH
    env["AC_APP_NAME"] = app_name
    env["container"] = "kvmpod"
    for name, value in [*image_env, *pod_env.items(), *app_env.items()]:
        env[name] = value
    env["AC_APP_NAME"] = app_name  # the executor's value wins: the spec defines it
    return [f"{k}={v}" for k, v in env.items()]


def resolve_app(image: StoredImage, overrides: AppOverrides, pod_env: dict[str, str], disk: Path,
                disk_serial: str) -> ResolvedApp:
    manifest = image.manifest
    app = manifest.app
    exec_ = list(app.exec) if app else []
    if overrides.exec:
        exec_ = [overrides.exec, *exec_[1:]]
    if overrides.args is not None:
        exec_ = exec_[:1] + overrides.args
    if not exec_:
        raise UsageError(f"{overrides.image}: the image has no app.exec; give one with --exec")
    if not exec_[0].startswith("/"):
        raise UsageError(f"--exec: {exec_[0]!r} is not an absolute path")
    name = overrides.name or default_app_name(manifest)
    if not AC_NAME.match(name):
        raise UsageError(f"--name: {name!r} is not an AC Name (lower-case letters, digits and dashes)")
    working_dir = overrides.working_dir or (app.working_directory if app else "/")
    if not working_dir.startswith("/"):
        raise UsageError(f"--working-dir: {working_dir!r} is not an absolute path")
    image_env = [(e.name, e.value) for e in app.environment] if app else []
    return ResolvedApp(
        name=name,
        image=image,
        disk=disk,
        disk_serial=disk_serial,
        argv=exec_,
        env=app_environment(name, image_env, pod_env, overrides.env),
        working_dir=working_dir,
        user=overrides.user or (app.user if app else "0"),
        group=overrides.group or (app.group if app else "0"),
        supplementary_gids=list(app.supplementary_gids) if app else [],
        readonly_rootfs=overrides.readonly_rootfs,
    )


def pod_manifest(apps: list[ResolvedApp]) -> dict:
    """The resolved appc PodManifest (spec/pods.md): apps by image ID, exactly as they run."""
    return {
        "acVersion": AC_VERSION,
        "acKind": "PodManifest",
        "apps": [
            {
                "name": a.name,
                "image": {
                    "name": a.image.manifest.name,
                    "id": a.image.id,
                    "labels": [{"name": k, "value": v} for k, v in a.image.manifest.labels.items()],
                },
                "app": {
                    "exec": a.argv,
                    "user": a.user,
                    "group": a.group,
                    "workingDirectory": a.working_dir,
                    "environment": [dict(zip(("name", "value"), e.split("=", 1))) for e in a.env],
                    "supplementaryGIDs": a.supplementary_gids,
                },
                "readOnlyRootFS": a.readonly_rootfs,
            }
            for a in apps
        ],
        "volumes": [],
        "isolators": [],
        "annotations": [],
        "ports": [],
    }
