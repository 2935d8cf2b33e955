"""From images and command-line overrides to the exact process each app runs (appc executor rules)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from kvmpod.agent.isolators import Isolators
from kvmpod.errors import ImageError, UsageError
from kvmpod.image.manifest import AC_VERSION, App, ImageManifest, Isolator, MountPoint
from kvmpod.image.names import AC_NAME
from kvmpod.pod.volumes import AppMount, Mount, Volume
from kvmpod.store import StoredImage

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # spec/ace.md

# The guest agent enforces the capability, seccomp and no-new-privileges isolators (docs/executor.md);
# these two apply to the VM as a whole (its memory and CPUs). Every other isolator gets a notice:
# spec/ace.md wants the user told which isolators were ignored.
VM_ISOLATORS = frozenset({"resource/memory", "resource/cpu"})
# spec/ace.md's seccomp wildcards; each masks the rest of its own set (no filter at all).
SECCOMP_WILDCARDS = {"os/linux/seccomp-retain-set": "@appc.io/all", "os/linux/seccomp-remove-set": "@appc.io/empty"}
EVENT_HANDLERS = ("pre-start", "post-stop")


@dataclass(frozen=True)
class ProcessExtras:
    """What an OCI runtime must apply to a process beyond appc's executor rules (docs/oci-runtime.md)."""

    rlimits: tuple[tuple[int, int, int], ...] = ()   # (RLIMIT_* number, soft, hard)
    oom_score_adj: int | None = None
    keep_etc: bool = False   # the root brings its own /etc/hosts and resolv.conf (no executor files)
    seccomp_skip_unknown: bool = False   # seccomp names this architecture lacks are skipped (OCI profiles)
    exec_path_lookup: bool = False   # a bare exec name is looked up in the app's PATH in the guest (as runc)


@dataclass
class AppOverrides:
    """What the user asked for one app: on the command line (rkt's per-app flags), or as one app of a
    pod manifest (kvmpod/pod/podmanifest.py: `app`, `image_name`, `image_labels`, `annotations`)."""

    image: str
    exec: str | None = None
    args: list[str] | None = None           # after `--`: replace the image's arguments
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    group: str | None = None
    working_dir: str | None = None
    name: str | None = None
    readonly_rootfs: bool = False
    app: App | None = None                  # replaces the image's app (a pod manifest's apps[].app)
    image_name: str | None = None           # the image must have this name (apps[].image.name)
    image_labels: dict[str, str] = field(default_factory=dict)   # ...and these labels
    annotations: dict[str, str] = field(default_factory=dict)    # the app's, merged by the metadata service
    mounts: list[Mount] = field(default_factory=list)            # --mount / apps[].mounts (pod/volumes.py)
    # An app that runs from a host directory rather than a store image (an OCI bundle's rootfs, rkt's
    # rendered app rootfs): the directory is shared with the guest over virtio-fs and used in place, so
    # what the app writes lands in it. `image` is then only a display name; the manifest (and its ID,
    # when one is known) stand for the image.
    rootfs_dir: Path | None = None
    image_manifest: ImageManifest | None = None
    image_id: str | None = None
    extras: ProcessExtras = field(default_factory=ProcessExtras)


@dataclass(frozen=True)
class ResolvedApp:
    name: str
    image: StoredImage
    disk: Path              # the image's rootfs disk on the host (with root_share: the rootfs directory)
    disk_serial: str        # how the guest finds that disk (with root_share: the virtio-fs tag)
    argv: list[str]
    env: list[str]
    working_dir: str
    user: str
    group: str
    supplementary_gids: list[int]
    readonly_rootfs: bool
    event_handlers: dict[str, list[str]] = field(default_factory=dict)  # "pre-start"/"post-stop" -> exec
    isolators: Isolators = field(default_factory=Isolators)            # what the guest enforces
    unenforced_isolators: list[str] = field(default_factory=list)      # names kvmpod does not enforce
    # all the isolators the app declares (resource ones size the VM: kvmpod/pod/resources.py)
    app_isolators: list[Isolator] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)          # the pod manifest's for this app
    mounts: list[AppMount] = field(default_factory=list)               # volumes in the app's root
    mount_points: list[MountPoint] = field(default_factory=list)       # the app's mountPoints (matched by name)
    explicit_mounts: list[Mount] = field(default_factory=list)         # --mount / apps[].mounts
    root_share: bool = False    # `disk` is a host directory shared over virtio-fs as the app's root
    extras: ProcessExtras = field(default_factory=ProcessExtras)


def default_app_name(manifest: ImageManifest) -> str:
    """rkt's rule: the last component of the image name, made a valid AC Name."""
    base = manifest.name.rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9]+", "-", base).strip("-")
    return name or "app"


def app_environment(app_name: str, image_env: list[tuple[str, str]], pod_env: dict[str, str],
                    app_env: dict[str, str], metadata_url: str = "") -> list[str]:
    """The executor's environment: PATH default, AC_APP_NAME, AC_METADATA_URL (when the pod has the
    metadata service: always in `kvmpod run`), container, then image, pod and app values."""
    env: dict[str, str] = {}
    names = {n for n, _ in image_env} | set(pod_env) | set(app_env)
    if "PATH" not in names:
        env["PATH"] = DEFAULT_PATH
    env["AC_APP_NAME"] = app_name
    if metadata_url:
        env["AC_METADATA_URL"] = metadata_url
    env["container"] = "kvmpod"
    for name, value in [*image_env, *pod_env.items(), *app_env.items()]:
        env[name] = value
    env["AC_APP_NAME"] = app_name  # the executor's values win: the spec defines them
    if metadata_url:
        env["AC_METADATA_URL"] = metadata_url
    return [f"{k}={v}" for k, v in env.items()]


def enforced_isolators(app_name: str, isolators: list[Isolator]) -> tuple[Isolators, list[str]]:
    """Split an app's isolators into what the guest enforces and the names of those nobody does.

    Manifests were validated on import (kvmpod/image/schema): the values of the isolators used here
    have their spec shapes, each name appears once, and no retain set comes with its remove set.
    """
    caps: dict[str, tuple[str, ...]] = {}
    seccomp: dict[str, tuple[str, ...]] = {}
    errno_name = ""
    no_new_privileges = False
    unenforced: list[str] = []
    for iso in isolators:
        if iso.name in ("os/linux/capabilities-retain-set", "os/linux/capabilities-remove-set"):
            caps[iso.name] = tuple(iso.value["set"])
        elif iso.name in SECCOMP_WILDCARDS:
            seccomp[iso.name] = _seccomp_set(app_name, iso)
            errno_name = iso.value.get("errno", "") or ""
        elif iso.name == "os/linux/no-new-privileges":
            no_new_privileges = bool(iso.value)
        elif iso.name not in VM_ISOLATORS:
            unenforced.append(iso.name)
    enforced = Isolators(
        caps_retain=caps.get("os/linux/capabilities-retain-set"),
        caps_remove=caps.get("os/linux/capabilities-remove-set"),
        seccomp_retain=seccomp.get("os/linux/seccomp-retain-set"),
        seccomp_remove=seccomp.get("os/linux/seccomp-remove-set"),
        seccomp_errno=errno_name,
        no_new_privileges=no_new_privileges,
    )
    return enforced, unenforced


def _seccomp_set(app_name: str, iso: Isolator) -> tuple[str, ...]:
    """The set as given; a wildcard other than the spec's own for this isolator is refused here,
    before a VM boots (the agent knows the syscall names and refuses unknown ones itself)."""
    values = tuple(iso.value["set"])
    wildcard = SECCOMP_WILDCARDS[iso.name]
    for value in values:
        if value.startswith("@") and value != wildcard:
            raise ImageError(f"app {app_name}: isolator {iso.name}: {value} is not supported "
                             f"(kvmpod implements {wildcard} there, and no other @-group)")
    return values


def isolator_notices(apps: list[ResolvedApp], pod_isolators: list[Isolator] | None = None) -> list[str]:
    """One line per isolator nobody enforces (spec/ace.md: the user must be told which were ignored).
    Of a pod manifest's own isolators only the VM-sizing ones apply."""
    return ([f"app {a.name}: isolator {name} is not enforced" for a in apps for name in a.unenforced_isolators]
            + [f"pod: isolator {i.name} is not enforced" for i in pod_isolators or [] if i.name not in VM_ISOLATORS])


def _check_image_identity(image: StoredImage, overrides: AppOverrides) -> None:
    """A pod manifest names an image by ID; its image.name and image.labels, if given, must agree."""
    manifest = image.manifest
    if overrides.image_name is not None and overrides.image_name != manifest.name:
        raise ImageError(f"app {overrides.name}: image.name {overrides.image_name!r} does not match image "
                         f"{image.id[:19]} (named {manifest.name!r})")
    for label, value in overrides.image_labels.items():
        if manifest.labels.get(label) != value:
            raise ImageError(f"app {overrides.name}: image.labels: {label}={value!r} does not match image "
                             f"{image.id[:19]} ({label}={manifest.labels.get(label)!r})")


def resolve_app(image: StoredImage, overrides: AppOverrides, pod_env: dict[str, str], disk: Path,
                disk_serial: str, metadata_url: str = "", root_share: bool = False) -> ResolvedApp:
    manifest = image.manifest
    _check_image_identity(image, overrides)
    app = overrides.app or manifest.app  # a pod manifest's app object replaces the image's whole
    exec_ = list(app.exec) if app else []
    if overrides.exec:
        exec_ = [overrides.exec, *exec_[1:]]
    if overrides.args is not None:
        exec_ = exec_[:1] + overrides.args
    if not exec_ and overrides.app:
        raise UsageError(f"app {overrides.name}: the pod manifest's app has no exec")
    if not exec_:
        raise UsageError(f"{overrides.image}: the image has no app.exec; give one with --exec")
    if not exec_[0].startswith("/") and not (overrides.extras.exec_path_lookup and "/" not in exec_[0]):
        raise UsageError(f"--exec: {exec_[0]!r} is not an absolute path")
    name = overrides.name or default_app_name(manifest)
    if not AC_NAME.match(name):
        raise UsageError(f"--name: {name!r} is not an AC Name (lower-case letters, digits and dashes)")
    working_dir = overrides.working_dir or (app.working_directory if app else "/")
    if not working_dir.startswith("/"):
        raise UsageError(f"--working-dir: {working_dir!r} is not an absolute path")
    image_env = [(e.name, e.value) for e in app.environment] if app else []
    isolators, unenforced = enforced_isolators(name, list(app.isolators) if app else [])
    if overrides.extras.seccomp_skip_unknown:
        isolators = dataclasses.replace(isolators, seccomp_skip_unknown=True)
    handlers = {h: list(app.event_handlers[h]) for h in EVENT_HANDLERS if app and h in app.event_handlers}
    return ResolvedApp(
        name=name,
        image=image,
        disk=disk,
        disk_serial=disk_serial,
        argv=exec_,
        env=app_environment(name, image_env, pod_env, overrides.env, metadata_url),
        working_dir=working_dir,
        user=overrides.user or (app.user if app else "0"),
        group=overrides.group or (app.group if app else "0"),
        supplementary_gids=list(app.supplementary_gids) if app else [],
        readonly_rootfs=overrides.readonly_rootfs,
        event_handlers=handlers,
        isolators=isolators,
        unenforced_isolators=unenforced,
        app_isolators=list(app.isolators) if app else [],
        annotations=dict(overrides.annotations),
        mount_points=list(app.mount_points) if app else [],
        explicit_mounts=list(overrides.mounts),
        root_share=root_share,
        extras=overrides.extras,
    )


def pod_manifest(apps: list[ResolvedApp], annotations: dict[str, str] | None = None,
                 isolators: list[Isolator] | None = None, volumes: list[Volume] | None = None) -> dict:
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
                    "eventHandlers": [{"name": n, "exec": e} for n, e in a.event_handlers.items()],
                    "isolators": [{"name": i.name, "value": i.value} for i in a.app_isolators],
                    "mountPoints": [{"name": m.name, "path": m.path, "readOnly": m.read_only}
                                    for m in a.mount_points],
                },
                "mounts": [{"volume": m.volume.name, "path": m.target} for m in a.mounts],
                "readOnlyRootFS": a.readonly_rootfs,
                "annotations": [{"name": k, "value": v} for k, v in a.annotations.items()],
            }
            for a in apps
        ],
        "volumes": [v.manifest() for v in volumes or []],
        "isolators": [{"name": i.name, "value": i.value} for i in isolators or []],
        "annotations": [{"name": k, "value": v} for k, v in (annotations or {}).items()],
        "ports": [],
    }
