"""A small rkt stage0, written from rkt's stage1 ABI (Documentation/devel/stage1-implementors-guide.md,
Documentation/devel/architecture.md, pod-lifecycle), to run kvmpod's stage1 ACI the way `rkt run`,
`rkt enter`, `rkt stop` and `rkt gc` do. Debian has no rkt; this is what the tests drive it with.

What it does, as rkt 1.30 does it (the stage1 ACI extracted into the pod directory, as with rkt's
`--no-overlay`; the apps' ACIs too, or with `overlay=True` as rkt does by default: each image rendered
once into <dir>/cas/tree/<image>, and an overlay mounted on the app's rootfs at run time, its upper
and work directories in <pod>/overlay/<image>/):

    <dir>/pods/embryo/<uuid>       made and flock()ed (LOCK_EX) through an open directory fd, renamed to
    <dir>/pods/prepare/<uuid>      where it is prepared:
        pod                        the pod manifest, as rkt's Go code marshals it (null for empty lists)
        pod-created, pod.lck
        stage1/manifest, stage1/rootfs/         the stage1 ACI
        appsinfo/<app>/manifest                 each app's image manifest
        stage1/rootfs/opt/stage2/<app>/manifest, .../rootfs/   each app's ACI
        stage1/rootfs/etc/rkt-resolv.conf, rkt-hosts           --dns / --hosts-entry (dns-conf-mode stage0)
    <dir>/pods/run/<uuid>          renamed there, still locked; the run entrypoint is exec'd in it with
                                   RKT_LOCK_FD=<the directory fd>, the fd's close-on-exec flag cleared

The entrypoints are found through the stage1 manifest's coreos.com/rkt/stage1/* annotations and run
with the argv of the guide: `run [--debug] --net=… [--interactive] [--mds-token=…] [--hostname=…]
[--dns-conf-mode=…] UUID`, `enter --pid=PID --appname=APP -- CMD…` (PID from the pod's `pid` file),
`stop [--force] UUID`, `gc [--debug] [--local-config DIR] UUID`. The images are trusted test images
(extracted as they are, owners and modes kept, as rkt's renderer does).

As a command (for benchmarks and by hand), it prepares a pod and execs the run entrypoint, as rkt does:

    python tests/stage0.py --stage1 build/kvmpod-stage1.aci [--dir DIR] [--stage1-flag F]... \\
        IMAGE.aci [--exec PATH] [--name NAME] [-- ARGS...] [--- IMAGE2.aci ...]
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RKT_VERSION = "1.30.0"   # the acVersion rkt writes into pod manifests is its own version
STAGE1_ENTRYPOINT = "coreos.com/rkt/stage1/{}"
INTERFACE_VERSION = "coreos.com/rkt/stage1/interface-version"
DIR_MODE, FILE_MODE = 0o750, 0o640   # common.DefaultRegularDirPerm / DefaultRegularFilePerm


@dataclass
class App:
    """One image of `rkt run`, with its app flags."""

    aci: Path
    name: str | None = None             # --name (default: the image name's last part, sanitized)
    exec: str | None = None             # --exec
    args: list[str] | None = None       # -- ARGS (appended to the exec, as rkt does)
    env: dict[str, str] = field(default_factory=dict)   # --set-env
    mounts: list[tuple[str, str]] = field(default_factory=list)   # --mount volume=NAME,target=PATH
    readonly_rootfs: bool = False
    user: str | None = None             # --user
    group: str | None = None            # --group


@dataclass
class Pod:
    uuid: str
    path: Path
    lock_fd: int | None         # the harness's until it is handed to the run entrypoint
    apps: list[str]
    interface_version: int

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)


def image_id(aci: Path) -> str:
    """rkt's image key: sha512 of the uncompressed tar, "sha512-" and its first 64 hex digits."""
    h = hashlib.sha512()
    with tarfile.open(aci, "r:*") as tar:
        raw = tar.fileobj
        raw.seek(0)
        while chunk := raw.read(1 << 20):
            h.update(chunk)
    return "sha512-" + h.hexdigest()[:64]


def app_name(image_name: str) -> str:
    """rkt's imageNameToAppName: the last part of the image name, made an AC Name."""
    last = image_name.rsplit("/", 1)[-1].lower()
    return re.sub(r"[^a-z0-9]+", "-", last).strip("-")


def read_manifest(aci: Path) -> tuple[dict[str, Any], bytes]:
    with tarfile.open(aci, "r:*") as tar:
        member = tar.extractfile("manifest")
        assert member is not None, f"{aci}: no manifest"
        data = member.read()
    return json.loads(data), data


def extract(aci: Path, dest: Path) -> None:
    """The ACI's manifest and rootfs/ into `dest` (trusted images: owners, modes, devices kept)."""
    dest.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    with tarfile.open(aci, "r:*") as tar:
        tar.extractall(dest, filter="fully_trusted")


def _lock_dir(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


class Stage0:
    def __init__(self, data_dir: Path, stage1_aci: Path):
        self.data_dir = data_dir
        self.stage1_aci = stage1_aci
        self.stage1_manifest, self.stage1_manifest_bytes = read_manifest(stage1_aci)
        for state in ("embryo", "prepare", "prepared", "run", "exited-garbage", "garbage"):
            (data_dir / "pods" / state).mkdir(parents=True, exist_ok=True, mode=DIR_MODE)

    # -- rkt prepare ----------------------------------------------------------------------------

    def entrypoint(self, which: str) -> str:
        for a in self.stage1_manifest.get("annotations", []):
            if a["name"] == STAGE1_ENTRYPOINT.format(which):
                return a["value"]
        raise LookupError(f"stage1 has no {which} entrypoint")

    def prepare(self, apps: list[App], volumes: list[dict[str, Any]] | None = None,
                ports: list[dict[str, Any]] | None = None, dns: list[str] | None = None,
                hosts_entries: list[tuple[str, str]] | None = None,
                pod_manifest: dict[str, Any] | None = None, overlay: bool = False) -> Pod:
        """A pod directory rendered as `rkt prepare` does, left locked in pods/run/<uuid>; with
        `overlay`, the apps' rootfs are overlays on the tree store's renderings (rkt's default)."""
        pod_uuid = str(uuidlib.uuid4())
        embryo = self.data_dir / "pods" / "embryo" / pod_uuid
        embryo.mkdir(mode=DIR_MODE)
        fd = _lock_dir(embryo)
        path = self.data_dir / "pods" / "prepare" / pod_uuid
        os.rename(embryo, path)
        (path / "appsinfo").mkdir(mode=DIR_MODE)
        extract(self.stage1_aci, path / "stage1")
        manifest_apps = []
        names = []
        for app in apps:
            manifest, raw = read_manifest(app.aci)
            name = app.name or app_name(manifest["name"])
            names.append(name)
            info = path / "appsinfo" / name
            info.mkdir(mode=DIR_MODE)
            (info / "manifest").write_bytes(raw)
            if overlay:   # the tree store: each image rendered once, shared by the pods (read-only lower)
                tree = self.data_dir / "cas" / "tree" / image_id(app.aci)
                if not tree.is_dir():
                    extract(app.aci, tree)
                self._write(info / "treeStoreID", tree.name.encode())
            else:
                extract(app.aci, path / "stage1" / "rootfs" / "opt" / "stage2" / name)
            manifest_apps.append(self._runtime_app(app, name, manifest))
        pm = pod_manifest or {
            "acVersion": RKT_VERSION, "acKind": "PodManifest", "apps": manifest_apps,
            "volumes": volumes or None, "isolators": None,
            "annotations": [{"name": "coreos.com/rkt/stage1/mutable", "value": "false"}],
            "ports": ports or None,
        }
        (path / "pod.lck").touch(mode=0o600)
        self._write(path / "pod", json.dumps(pm).encode())
        (path / "pod-created").touch(mode=FILE_MODE)
        etc = path / "stage1" / "rootfs" / "etc"
        if dns:
            etc.mkdir(exist_ok=True, mode=DIR_MODE)
            self._write(etc / "rkt-resolv.conf",
                        ("# Generated by rkt run\n" + "".join(f"nameserver {d}\n" for d in dns)).encode(), 0o644)
        if hosts_entries:
            etc.mkdir(exist_ok=True, mode=DIR_MODE)
            lines = "".join(f"{ip} {name}\n" for ip, name in hosts_entries)
            self._write(etc / "rkt-hosts", ("#created by rkt stage0\n127.0.0.1 localhost localhost.localdomain\n"
                                            "\n\n# Added by rkt run --hosts-entry\n" + lines).encode(), 0o644)
        if overlay:
            (path / "overlay-prepared").touch(mode=FILE_MODE)
        run_path = self.data_dir / "pods" / "run" / pod_uuid
        os.rename(path, run_path)
        for name in names if overlay else ():   # setupAppImage: the overlays, at run time
            self._mount_overlay(run_path, name)
        for name in names:  # setupAppImage: /etc/mtab for tools that want it
            etc_dir = run_path / "stage1" / "rootfs" / "opt" / "stage2" / name / "rootfs" / "etc"
            if etc_dir.is_dir() and not os.path.lexists(etc_dir / "mtab"):
                os.symlink("../proc/self/mounts", etc_dir / "mtab")
        version = next((int(a["value"]) for a in self.stage1_manifest.get("annotations", [])
                        if a["name"] == INTERFACE_VERSION), 1)
        return Pod(pod_uuid, run_path, fd, names, version)

    def _mount_overlay(self, pod_path: Path, name: str) -> None:
        tree_id = (pod_path / "appsinfo" / name / "treeStoreID").read_text()
        app_dir = pod_path / "stage1" / "rootfs" / "opt" / "stage2" / name
        (app_dir / "rootfs").mkdir(parents=True, mode=DIR_MODE)
        (app_dir / "manifest").write_bytes((pod_path / "appsinfo" / name / "manifest").read_bytes())
        upper = pod_path / "overlay" / tree_id / "upper" / name
        work = pod_path / "overlay" / tree_id / "work" / name
        upper.mkdir(parents=True, mode=DIR_MODE)
        work.mkdir(parents=True, mode=DIR_MODE)
        lower = self.data_dir / "cas" / "tree" / tree_id / "rootfs"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                        str(app_dir / "rootfs")], check=True)

    @staticmethod
    def unmount(pod: Pod) -> None:
        """What rkt gc's MountGC does: every mount under the pod directory, deepest first."""
        prefix = str(pod.path) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", point], check=True)

    @staticmethod
    def _write(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
        path.write_bytes(data)
        path.chmod(mode)

    @staticmethod
    def _runtime_app(app: App, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """generateRuntimeApp: the image's app, --exec replacing exec, ARGS appended, env merged."""
        runtime_app = json.loads(json.dumps(manifest.get("app"))) if manifest.get("app") else None
        if app.exec:
            if runtime_app is None:
                runtime_app = {"user": str(os.getuid()), "group": str(os.getgid())}
            runtime_app["exec"] = [app.exec]
        if app.args is not None:
            runtime_app["exec"] = [*runtime_app.get("exec", []), *app.args]
        if app.user:
            runtime_app["user"] = app.user
        if app.group:
            runtime_app["group"] = app.group
        if app.env:
            env = {e["name"]: e["value"] for e in runtime_app.get("environment", [])}
            env.update(app.env)
            runtime_app["environment"] = [{"name": k, "value": v} for k, v in env.items()]
        entry: dict[str, Any] = {"name": name,
                                 "image": {"name": manifest["name"], "id": image_id(app.aci),
                                           **({"labels": manifest["labels"]} if manifest.get("labels") else {})},
                                 "app": runtime_app}
        if app.mounts:
            entry["mounts"] = [{"volume": v, "path": p} for v, p in app.mounts]
        if app.readonly_rootfs:
            entry["readOnlyRootFS"] = True
        return entry

    # -- rkt run: exec the run entrypoint ---------------------------------------------------------

    def run_argv(self, pod: Pod, *, debug: bool = False, net: str = "default", interactive: bool = False,
                 mds_token: str = "", local_config: str = "", hostname: str = "",
                 dns_conf_mode: str = "", extra: tuple[str, ...] = ()) -> list[str]:
        """stage0's argv for the run entrypoint, exactly as rkt builds it."""
        argv = [str(pod.file("stage1", "rootfs", self.entrypoint("run").lstrip("/")))]
        if debug:
            argv.append("--debug")
        argv.append(f"--net={net}")
        if interactive:
            argv.append("--interactive")
        if mds_token:
            argv.append(f"--mds-token={mds_token}")
        if local_config:
            argv.append(f"--local-config={local_config}")
        if hostname and pod.interface_version > 1:
            argv.append(f"--hostname={hostname}")
        if dns_conf_mode and pod.interface_version > 3:
            argv.append(f"--dns-conf-mode={dns_conf_mode}")
        return [*argv, *extra, pod.uuid]

    def spawn_run(self, pod: Pod, argv: list[str], env: dict[str, str] | None = None,
                  **popen: Any) -> subprocess.Popen:
        """The run entrypoint in the pod directory with RKT_LOCK_FD (rkt execs it; this forks first).
        The harness's copy of the lock fd is closed: from now on only the pod's process holds the lock."""
        assert pod.lock_fd is not None, "this pod has been run already"
        fd, pod.lock_fd = pod.lock_fd, None
        os.set_inheritable(fd, True)
        try:
            return subprocess.Popen(argv, cwd=pod.path, env={**(env or os.environ), "RKT_LOCK_FD": str(fd)},
                                    pass_fds=(fd,), **popen)
        finally:
            os.close(fd)

    def run(self, pod: Pod, argv: list[str], env: dict[str, str] | None = None, timeout: float = 240,
            **popen: Any) -> subprocess.CompletedProcess:
        input_ = popen.pop("input", None)
        popen.setdefault("stdin", subprocess.DEVNULL if input_ is None else subprocess.PIPE)
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        proc = self.spawn_run(pod, argv, env, **popen)
        out, err = proc.communicate(input_, timeout=timeout)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    # -- the pod's state, as rkt reads it -------------------------------------------------------

    @staticmethod
    def running(pod: Pod) -> bool:
        """pods/run/<uuid> and its lock held: running; lock free: exited."""
        probe = os.open(pod.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(probe)
        return False

    def wait_pid(self, pod: Pod, timeout: float = 240) -> int:
        """ContainerPid1: the `pid` file (else `ppid`'s only child), waiting while the pod runs."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name in ("pid", "ppid"):
                try:
                    pid = int(pod.file(name).read_text().strip())
                except (OSError, ValueError):
                    continue
                if name == "pid":
                    return pid
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                if len(children) == 1:
                    return int(children[0])
            if not self.running(pod):
                raise RuntimeError(f"pod {pod.uuid} is not running anymore")
            time.sleep(0.1)
        raise TimeoutError(f"pod {pod.uuid} wrote no pid file in {timeout} s")

    @staticmethod
    def statuses(pod: Pod) -> dict[str, int]:
        """What `rkt status` shows: stage1/rootfs/rkt/status/<app> for each app that has one."""
        status_dir = pod.file("stage1", "rootfs", "rkt", "status")
        out = {}
        for name in pod.apps:
            try:
                out[name] = int(re.match(r"\s*(-?\d+)", (status_dir / name).read_text()).group(1))
            except (OSError, AttributeError):
                pass
        return out

    # -- rkt enter, stop, gc ------------------------------------------------------------------------

    def enter(self, pod: Pod, app: str, command: list[str], env: dict[str, str] | None = None,
              timeout: float = 120, **popen: Any) -> subprocess.CompletedProcess:
        pid = self.wait_pid(pod)
        argv = [str(pod.file("stage1", "rootfs", self.entrypoint("enter").lstrip("/"))),
                f"--pid={pid}", f"--appname={app}", "--", *command]
        popen.setdefault("capture_output", True)
        return subprocess.run(argv, cwd=pod.path, env=env, timeout=timeout, **popen)

    def stop(self, pod: Pod, force: bool = False, env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [str(pod.file("stage1", "rootfs", self.entrypoint("stop").lstrip("/"))),
                *(["--force"] if force else []), pod.uuid]
        return subprocess.run(argv, cwd=pod.path, env=env, timeout=timeout, capture_output=True)

    def gc(self, pod: Pod, debug: bool = False, local_config: str = "", env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
        """rkt gc of an exited pod: the gc entrypoint in the pod directory, then the directory goes."""
        assert not self.running(pod), "rkt gc only collects exited pods"
        argv = [str(pod.file("stage1", "rootfs", self.entrypoint("gc").lstrip("/")))]
        if debug:
            argv.append("--debug")
        if local_config and pod.interface_version >= 5:
            argv += ["--local-config", local_config]
        result = subprocess.run([*argv, pod.uuid], cwd=pod.path, env=env, timeout=timeout, capture_output=True)
        if result.returncode == 0:
            self.unmount(pod)
            subprocess.run(["rm", "-rf", "--one-file-system", str(pod.path)], check=True)
        return result


def _parse_apps(words: list[str]) -> list[App]:
    apps: list[App] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "---":
            i += 1
            continue
        if word == "--":
            end = words.index("---", i) if "---" in words[i:] else len(words)
            apps[-1].args = words[i + 1:end]
            i = end
            continue
        if word in ("--exec", "--name"):
            setattr(apps[-1], word[2:], words[i + 1])
            i += 2
            continue
        apps.append(App(Path(word)))
        i += 1
    return apps


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="tests/stage0.py", description="prepare a pod and exec the stage1's "
                                     "run entrypoint, as rkt run does")
    parser.add_argument("--stage1", required=True, type=Path)
    parser.add_argument("--dir", type=Path, default=Path("/var/lib/rkt"))
    parser.add_argument("--stage1-flag", action="append", default=[], help="passed to the run entrypoint")
    parser.add_argument("words", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    stage0 = Stage0(ns.dir, ns.stage1)
    pod = stage0.prepare(_parse_apps(ns.words))
    net = next((f.split("=", 1)[1] for f in ns.stage1_flag if f.startswith("--net=")), "default")
    args = stage0.run_argv(pod, net=net, extra=tuple(f for f in ns.stage1_flag if not f.startswith("--net=")))
    assert pod.lock_fd is not None
    os.set_inheritable(pod.lock_fd, True)   # rkt clears FD_CLOEXEC on the lock before its exec
    os.environ["RKT_LOCK_FD"] = str(pod.lock_fd)
    os.chdir(pod.path)
    os.execv(args[0], args)


if __name__ == "__main__":
    main(sys.argv[1:])
