"""Pod volumes (appc spec/pods.md): `--volume`/`--mount` and a pod manifest's `volumes`/`mounts`,
matched to each app's mount points, checked on the host, and encoded for the agent (docs/volumes.md).

kind=empty: one tmpfs per volume in the guest, shared by every app that mounts it, for the pod's life.
kind=host: the host directory `source`, shared with the guest by one virtiofsd per volume
(kvmpod/vm/virtiofs.py), whose virtio-fs tag the agent mounts.
Every mount is a bind mount of the volume into the app's root, read-only when the volume or the
mount point says so.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kvmpod import config as settings
from kvmpod.errors import ConfigError, UsageError
from kvmpod.image.manifest import MountPoint
from kvmpod.image.names import AC_NAME

KINDS = ("empty", "host")
OWNER = re.compile(r"^(source|[0-9]{1,10}:[0-9]{1,10})$")
DEFAULT_EMPTY_MODE = 0o755


@dataclass(frozen=True)
class Volume:
    name: str
    kind: str                       # "empty" | "host"
    source: str | None = None       # kind=host: an absolute host directory
    read_only: bool = False
    mode: int = DEFAULT_EMPTY_MODE  # kind=empty: the tmpfs root's mode, uid and gid
    uid: int = 0
    gid: int = 0
    # kind=host: whose the files the guest's root writes are on the host: "source" (the source
    # directory's owner) or "UID:GID"; None: root's, as the guest's owners are kept (docs/volumes.md)
    owner: str | None = None

    def manifest(self) -> dict:
        """The volume as a PodManifest `volumes` entry."""
        out: dict = {"name": self.name, "kind": self.kind, "readOnly": self.read_only}
        if self.kind == "host":
            out["source"] = self.source
        else:
            out.update(mode=f"{self.mode:04o}", uid=self.uid, gid=self.gid)
        return out


@dataclass(frozen=True)
class Mount:
    """An app's explicit mount (`--mount volume=NAME,target=PATH`, a pod manifest's apps[].mounts)."""
    volume: str
    target: str
    file: str = ""      # non-empty: `target` is a file, bound from this file of the volume (OCI file binds)


@dataclass(frozen=True)
class AppMount:
    """What the agent does for one app: bind volume `volume` at `target`, read-only or not."""
    volume: Volume
    target: str
    read_only: bool
    file: str = ""      # see Mount.file

    def field(self, tag: str, transport: str = "virtiofs") -> str:
        """START's VOLUME_MOUNT value: `NAME:KIND:OPTIONS:TARGET` (docs/agent-protocol.md).
        Names are AC Names and OPTIONS hold no ':', so the target may contain any byte but NUL."""
        v = self.volume
        if v.kind == "empty":
            options = f"mode={v.mode:04o},uid={v.uid},gid={v.gid}"
        else:
            options = f"tag={tag}" + (",9p" if transport == "9p" else "") + (",ro" if v.read_only else "")
        file = f",file={self.file}" if self.file else ""
        return f"{v.name}:{v.kind}:{options}{file}{',bindro' if self.read_only else ''}:{self.target}"


def _bool(flag: str, key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UsageError(f"{flag}: {key}={value!r} is not true or false")


def _int(flag: str, key: str, value: str, base: int = 10, limit: int = 2**32 - 2) -> int:
    try:
        n = int(value, base)
    except ValueError:
        n = -1
    if not 0 <= n <= limit:
        raise UsageError(f"{flag}: {key}={value!r} is not a valid {'octal mode' if base == 8 else 'number'}")
    return n


def _pairs(flag: str, text: str, first: str | None) -> tuple[str | None, dict[str, str]]:
    """`[FIRST,]key=value,...` (rkt's syntax); FIRST is a bare word when `first` names it."""
    head = None
    items = text.split(",")
    if first is not None and items and "=" not in items[0]:
        head, items = items[0], items[1:]
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"{flag}: {item!r} is not key=value")
        if key in out:
            raise UsageError(f"{flag}: {key} is given twice")
        out[key] = value
    return head, out


def parse_volume(text: str) -> Volume:
    """`NAME,kind=host,source=/abs[,readOnly=true]` or `NAME,kind=empty[,mode=0755,uid=N,gid=N]`."""
    flag = "--volume"
    name, kv = _pairs(flag, text, "name")
    name = name or kv.pop("name", None)
    if not name:
        raise UsageError(f"{flag}: {text!r} has no volume name")
    return make_volume(flag, name, kv)


def make_volume(where: str, name: str, kv: dict) -> Volume:
    """A volume from its fields (flag strings or pod manifest JSON values); `where` prefixes errors."""
    if not AC_NAME.match(name):
        raise UsageError(f"{where}: volume name {name!r} is not an AC Name")
    known = {"kind", "source", "readOnly", "mode", "uid", "gid", "recursive", "owner"}
    for key in kv:
        if key not in known:
            raise UsageError(f"{where}: volume {name}: unknown key {key!r}")
    kind = kv.get("kind")
    if kind not in KINDS:
        raise UsageError(f"{where}: volume {name}: kind must be host or empty, not {kind!r}")
    ro = kv.get("readOnly", False)
    read_only = ro if isinstance(ro, bool) else _bool(where, "readOnly", str(ro))
    if kind == "host":
        for key in ("mode", "uid", "gid"):
            if key in kv:
                raise UsageError(f"{where}: volume {name}: {key} applies to kind=empty only")
        source = kv.get("source")
        if not isinstance(source, str) or not source.startswith("/"):
            raise UsageError(f"{where}: volume {name}: kind=host needs source=/absolute/path")
        owner = kv.get("owner")
        if owner is not None and (not isinstance(owner, str) or not OWNER.match(owner)):
            raise UsageError(f"{where}: volume {name}: owner must be source or UID:GID, not {owner!r}")
        return Volume(name, kind, os.path.normpath(source), read_only, owner=owner)
    for key in ("source", "owner"):
        if key in kv:
            raise UsageError(f"{where}: volume {name}: {key} applies to kind=host only")
    mode = _int(where, "mode", str(kv.get("mode", "0755")), 8, 0o7777)
    uid = _int(where, "uid", str(kv.get("uid", 0)))
    gid = _int(where, "gid", str(kv.get("gid", 0)))
    return Volume(name, kind, None, read_only, mode, uid, gid)


def parse_mount(text: str) -> Mount:
    """`volume=NAME,target=/path` (rkt's app flag)."""
    flag = "--mount"
    _, kv = _pairs(flag, text, None)
    unknown = set(kv) - {"volume", "target"}
    if unknown:
        raise UsageError(f"{flag}: unknown key {sorted(unknown)[0]!r} (it takes volume=NAME,target=PATH)")
    if "volume" not in kv or "target" not in kv:
        raise UsageError(f"{flag}: {text!r} needs volume=NAME,target=PATH")
    return make_mount(flag, kv["volume"], kv["target"])


def make_mount(where: str, volume: str, target: str) -> Mount:
    if not AC_NAME.match(volume):
        raise UsageError(f"{where}: volume name {volume!r} is not an AC Name")
    if not target.startswith("/") or "\0" in target:
        raise UsageError(f"{where}: target {target!r} is not an absolute path")
    parts = [p for p in target.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"{where}: target {target!r} contains '..'")
    if not parts:
        raise UsageError(f"{where}: target {target!r}: a volume cannot replace the app's root")
    return Mount(volume, "/" + "/".join(parts))


def unique_volumes(volumes: list[Volume], where: str = "--volume") -> dict[str, Volume]:
    out: dict[str, Volume] = {}
    for v in volumes:
        if v.name in out:
            raise UsageError(f"{where}: volume {v.name} is defined twice")
        out[v.name] = v
    return out


def app_mounts(app_name: str, volumes: dict[str, Volume], explicit: list[Mount],
               mount_points: list[MountPoint]) -> tuple[list[AppMount], list[str]]:
    """One app's mounts, and notices. Explicit mounts win; without them, the image's mountPoints are
    matched to volumes by name (spec/pods.md). A mount point no volume satisfies is not mounted (notice)."""
    notices: list[str] = []
    by_name = {m.name: m for m in mount_points}
    out: list[AppMount] = []
    if explicit:
        for m in explicit:
            if m.volume not in volumes:
                raise UsageError(f"app {app_name}: --mount volume={m.volume}: no such volume (give --volume {m.volume},...)")
            mp = by_name.get(m.volume)
            ro = volumes[m.volume].read_only or (mp is not None and mp.read_only)
            out.append(AppMount(volumes[m.volume], m.target, ro, m.file))
    else:
        for mp in mount_points:
            if mp.name in volumes:
                target = make_mount(f"app {app_name}: mountPoint {mp.name}", mp.name, mp.path).target
                out.append(AppMount(volumes[mp.name], target, volumes[mp.name].read_only or mp.read_only))
            else:
                notices.append(f"app {app_name}: mount point {mp.name} ({mp.path}) has no volume: not mounted")
    check_overlaps(app_name, out)
    return out, notices


def check_overlaps(app_name: str, mounts: list[AppMount]) -> None:
    """Two mounts of one app on the same target, or one inside the other, are refused: the second
    would hide (part of) the first."""
    for i, a in enumerate(mounts):
        for b in mounts[i + 1:]:
            if a.target == b.target or b.target.startswith(a.target + "/") or a.target.startswith(b.target + "/"):
                raise UsageError(f"app {app_name}: mount targets overlap: {a.target} (volume {a.volume.name}) "
                                 f"and {b.target} (volume {b.volume.name})")


def check_host_source(volume: Volume) -> None:
    """A host volume's source must exist, be a directory, and be no symlink (neither it nor the
    path to it: virtiofsd would follow it elsewhere)."""
    assert volume.source is not None
    where = f"--volume {volume.name}: source {volume.source}"
    try:
        st = os.lstat(volume.source)
    except FileNotFoundError as cause:
        raise UsageError(f"{where}: no such directory") from cause
    except OSError as e:
        raise UsageError(f"{where}: {e.strerror}") from e
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{where}: is a symlink (give the real path)")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{where}: is not a directory")
    if os.path.realpath(volume.source) != volume.source:
        raise UsageError(f"{where}: its path goes through a symlink (give the real path "
                         f"{os.path.realpath(volume.source)})")


def host_owner(volume: Volume) -> tuple[int, int] | None:
    """The host uid and gid the guest's root is for a host volume (its `owner`), None when it is root
    (no mapping). After check_host_source: `source` is the directory's owner."""
    if volume.owner is None:
        return None
    if volume.owner == "source":
        st = os.stat(source_path(volume))
        uid, gid = st.st_uid, st.st_gid
    else:
        uid, gid = (int(n) for n in volume.owner.split(":"))
    if uid > MAX_ID or gid > MAX_ID:
        raise UsageError(f"--volume {volume.name}: owner {uid}:{gid} is beyond {MAX_ID}")
    return None if (uid, gid) == (0, 0) else (uid, gid)


MAX_ID = 65535   # the ids a volume's owner mapping covers (kvmpod/vm/virtiofs.py id_map)


@dataclass(frozen=True)
class PodVolumes:
    """The pod's volumes in use, in order, with the virtio-fs tag of each host volume."""
    volumes: list[Volume] = field(default_factory=list)
    transport: str = "virtiofs"     # host volumes: "virtiofs" or "9p" (host_transport)

    @property
    def host(self) -> list[Volume]:
        return [v for v in self.volumes if v.kind == "host"]

    def tag(self, volume: Volume) -> str:
        """virtio-fs tags are at most 36 bytes: a short index, not the name."""
        return f"kvmpodvol{self.host.index(volume)}" if volume.kind == "host" else ""


def pod_volumes(volumes: dict[str, Volume], mounts: list[list[AppMount]]) -> PodVolumes:
    """The volumes some app mounts (an unused host volume gets no virtiofsd), host sources checked."""
    used = {m.volume.name for app in mounts for m in app}
    chosen = [v for v in volumes.values() if v.name in used]
    for v in chosen:
        if v.kind == "host":
            check_host_source(v)
    return PodVolumes(chosen)


TRANSPORT_ENV = "KVMPOD_VOLUME_TRANSPORT"
TRANSPORT_CHOICES = ("auto", "virtiofs", "9p")


def transport_setting() -> str:
    """`[run] volume-transport` in kvmpod.toml: "auto" (the default), "virtiofs" or "9p". 9p pods start
    from a boot snapshot, virtio-fs ones boot cold (docs/volumes.md, "Which transport")."""
    found = settings.lookup("volume-transport", "run")
    if found is None:
        return "auto"
    if found.value not in TRANSPORT_CHOICES:
        raise ConfigError(f"{found.describe('[run] volume-transport')}: {found.value!r} is not one of "
                          f"{', '.join(TRANSPORT_CHOICES)}")
    return found.value


def host_transport(have_virtiofsd: bool, is_root: bool) -> tuple[str, str | None]:
    """virtio-fs when virtiofsd can run (it needs root for its namespace sandbox), else virtio-9p
    served by QEMU itself; KVMPOD_VOLUME_TRANSPORT=virtiofs|9p forces one, else `[run] volume-transport`
    chooses. Returns (transport, notice)."""
    forced = os.environ.get(TRANSPORT_ENV, "")
    if forced in ("virtiofs", "9p"):
        return forced, None
    if forced:
        raise UsageError(f"{TRANSPORT_ENV}={forced!r}: use virtiofs or 9p")
    chosen = transport_setting()
    if chosen != "auto":
        return chosen, None
    if have_virtiofsd and is_root:
        return "virtiofs", None
    why = "virtiofsd needs root" if have_virtiofsd else "virtiofsd is not installed"
    return "9p", f"host volumes use virtio-9p ({why})" + ("" if is_root else ": file owners are not kept")


def source_path(volume: Volume) -> Path:
    assert volume.source is not None
    return Path(volume.source)
