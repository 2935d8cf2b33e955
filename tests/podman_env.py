"""An isolated podman for tests and benchmarks: its storage, run root, tmpdir and network config under
one directory, inside a network namespace of its own (nsenter --net: netavark's bridge, firewall
rules and port forwards live there, never in the machine's namespace), with a busybox image imported.

kvmpod-oci is given to podman through a wrapper that points it at the caller's kvmpod directories,
since conmon passes no environment on to the runtime.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PODMAN = shutil.which("podman")
KVMPOD_OCI = Path(sys.executable).parent / "kvmpod-oci"
IMAGE = "localhost/kvmpod-test/bb:1"
CONFIGURED = "localhost/kvmpod-test/configured:1"   # ENV GREETING, WORKDIR /home/app, USER 1000:1000
KVMPOD_ENV_KEYS = ("KVMPOD_RUN_DIR", "KVMPOD_STORE_DIR", "KVMPOD_AUDIT_LOG", "XDG_CONFIG_HOME", "KVMPOD_SNAPSHOT_DIR",
                   "KVMPOD_CONFIG")
TIMEOUT = 240


@dataclass
class Podman:
    base: Path
    netns: str
    runtime: Path
    env: dict[str, str]

    def argv(self, *args: str, runtime: str | None = None) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", PODMAN or "podman",
                "--root", str(self.base / "storage"), "--runroot", str(self.base / "run"),
                "--tmpdir", str(self.base / "libpod"), "--network-config-dir", str(self.base / "networks"),
                "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--storage-driver", "overlay",
                "--runtime", runtime or str(self.runtime), *args]

    def __call__(self, *args: str, input: bytes | None = None, check: bool = False, timeout: float = TIMEOUT,
                 runtime: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(self.argv(*args, runtime=runtime), input=input, capture_output=True, env=self.env,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}: {done.stderr.decode()[-2000:]}")
        return done

    def in_netns(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", *argv], capture_output=True,
                              timeout=timeout)


def unmount_below(path: Path) -> None:
    """podman's overlay mounts (and its storage's own bind mount) under `path`, deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(str(path))), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def clear_leftovers(podman: "Podman") -> list[str]:
    """Removes every container, kvmpod-oci record and podman netns a test left, and names them.

    A test that fails midway leaves its container; clearing everything here (not only asserting)
    keeps that one failure from failing every later test's leftover check too."""
    left = [f"container {n}" for n in podman("ps", "--all", "--format", "{{.Names}}").stdout.decode().split()]
    if left:
        podman("rm", "--force", "--time", "0", "--all")
    records = podman.base / "oci-root"
    for record in sorted(records.glob("*")) if records.is_dir() else []:
        left.append(f"kvmpod-oci record {record.name}")
        subprocess.run([str(podman.runtime), "delete", "--force", record.name], capture_output=True, env=podman.env)
        if record.exists():
            shutil.rmtree(record, ignore_errors=True)
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        if name.startswith("netns-"):   # podman's own; the module's namespace is kvmpod-oci-test-*
            left.append(f"podman netns {name}")
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return left


def _write_wrapper(path: Path, kvmpod_env: dict[str, str], oci_root: Path) -> None:
    lines = ["#!/bin/sh", *(f"export {k}='{kvmpod_env[k]}'" for k in KVMPOD_ENV_KEYS if k in kvmpod_env),
             f"export KVMPOD_OCI_ROOT='{oci_root}'", f"exec '{KVMPOD_OCI}' \"$@\""]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


@contextlib.contextmanager
def isolated_podman(base: Path, kvmpod_env: dict[str, str], rootfs: Path) -> Iterator[Podman]:
    for sub in ("storage", "run", "libpod", "networks"):
        (base / sub).mkdir(parents=True)
    (base / "containers.conf").write_text(
        '[containers]\n'
        "# below this sandbox's hard limits (shared/machine-facts.md): podman's defaults cannot be set here\n"
        'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    (base / "storage.conf").write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/storage"\n'
                                       f'runroot = "{base}/run"\n')
    env = {**os.environ, **kvmpod_env, "CONTAINERS_CONF": str(base / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(base / "storage.conf")}
    _write_wrapper(base / "kvmpod-oci", kvmpod_env, base / "oci-root")
    netns = f"kvmpod-oci-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    podman = Podman(base, netns, base / "kvmpod-oci", env)
    try:
        podman.in_netns("ip", "link", "set", "lo", "up")
        with tarfile.open(base / "rootfs.tar", "w") as tar:
            tar.add(rootfs, arcname=".")
        podman("import", str(base / "rootfs.tar"), IMAGE, check=True)
        podman("import", "--change", "ENV=GREETING=from-the-image", "--change", "WORKDIR=/home/app",
               "--change", "USER=1000:1000", str(base / "rootfs.tar"), CONFIGURED, check=True)
        yield podman
    finally:
        podman("rm", "--all", "--force", "--time", "0")
        podman("volume", "rm", "--all", "--force")
        podman("rmi", "--all", "--force")
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)
