"""A busybox image built FROM scratch with buildah, saved as a docker-archive and an oci-archive.

    from tests.oci_images import busybox_oci_archives  # noqa: F401  (the session fixture)

    def test_x(busybox_oci_archives):
        busybox_oci_archives.docker_archive, busybox_oci_archives.oci_archive

Two layers, so that a real tool's whiteout is in it: the first holds /bin/busybox (Debian's
busybox-static) with sh, echo and cat as symlinks to it, /etc/greeting and /etc/obsolete; the
second rewrites /etc/greeting and deletes /etc/obsolete. The config sets Entrypoint, Cmd, Env,
WorkingDir and User (BUSYBOX_CONFIG). Running it prints GREETING_LINE then the greeting file.

buildah runs with its storage under the build directory (vfs driver, no daemon: no image or layer
goes to the machine's container storage, and the storage is deleted once the archives are written).
Run as root, buildah still creates two things its libraries hard-code: the digest cache
/var/lib/containers/cache/blob-info-cache-v1.boltdb and an empty /run/containers/networks.
`buildah mount` needs root (or `buildah unshare`); where buildah cannot run the fixture skips with
the reason. Debian packages: buildah, busybox-static.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

BUSYBOX = Path("/bin/busybox")
IMAGE = "example.com/kvmpod-test/busybox:1.0"
GREETING = "hello from a converted OCI image\n"
GREETING_LINE = "greeting from /srv as 1000:1000"  # what the Cmd prints before cat'ing the file
BUSYBOX_CONFIG = {
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ['echo "$GREETING from $(pwd) as $USER_IDS"; cat /etc/greeting'],
    "Env": ["PATH=/bin", "GREETING=greeting", "USER_IDS=1000:1000"],
    "WorkingDir": "/srv",
    "User": "1000:1000",
}


@dataclass(frozen=True)
class OciArchives:
    docker_archive: Path
    oci_archive: Path


class ToolUnavailable(Exception):
    """buildah (or busybox-static) is missing or cannot run here; the message says which and why."""


def build_busybox_archives(work: Path) -> OciArchives:
    """Build the image with buildah under `work` and save it both ways; ToolUnavailable if that cannot be done."""
    if shutil.which("buildah") is None:
        raise ToolUnavailable("buildah is not installed (Debian package: buildah)")
    if not BUSYBOX.is_file():
        raise ToolUnavailable(f"{BUSYBOX} is missing (Debian package: busybox-static)")
    storage = ["--root", str(work / "storage"), "--runroot", str(work / "run"), "--storage-driver", "vfs"]
    # Not the machine's storage.conf (it may name other stores), and big temporary files under `work`.
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"), "TMPDIR": str(work / "tmp")}
    (work / "storage.conf").write_text('[storage]\ndriver = "vfs"\n')
    (work / "tmp").mkdir()

    def buildah(*args: str) -> str:
        try:
            done = subprocess.run(["buildah", *storage, *args], env=env, capture_output=True, text=True,
                                  timeout=300)
        except subprocess.TimeoutExpired:
            raise ToolUnavailable(f"buildah {args[0]} did not finish in 300 s") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ToolUnavailable(f"buildah {args[0]} failed here (exit {done.returncode}): {last}")
        return done.stdout.strip()

    files = work / "files"
    (files / "srv").mkdir(parents=True)
    (files / "greeting").write_text("an old greeting\n")
    (files / "obsolete").write_text("deleted by the second layer\n")
    ctr = buildah("from", "scratch")
    buildah("copy", ctr, str(BUSYBOX), "/bin/busybox")
    buildah("copy", ctr, str(files / "srv"), "/srv")
    buildah("copy", ctr, str(files / "greeting"), "/etc/greeting")
    buildah("copy", ctr, str(files / "obsolete"), "/etc/obsolete")
    mount = Path(buildah("mount", ctr))
    for applet in ("sh", "echo", "cat"):
        os.symlink("busybox", mount / "bin" / applet)
    buildah("umount", ctr)
    buildah("commit", "--quiet", ctr, "kvmpod-test-base")
    ctr = buildah("from", "kvmpod-test-base")
    mount = Path(buildah("mount", ctr))
    (mount / "etc" / "obsolete").unlink()  # -> a whiteout in the second layer
    (mount / "etc" / "greeting").write_text(GREETING)
    buildah("umount", ctr)
    buildah("config", "--entrypoint", json.dumps(BUSYBOX_CONFIG["Entrypoint"]), "--cmd", json.dumps(BUSYBOX_CONFIG["Cmd"]),
            *(arg for e in BUSYBOX_CONFIG["Env"] for arg in ("--env", e)),
            "--workingdir", BUSYBOX_CONFIG["WorkingDir"], "--user", BUSYBOX_CONFIG["User"], ctr)
    buildah("commit", "--quiet", ctr, IMAGE)
    archives = OciArchives(work / "busybox-docker.tar", work / "busybox-oci.tar")
    buildah("push", "--quiet", IMAGE, f"docker-archive:{archives.docker_archive}:{IMAGE}")
    buildah("push", "--quiet", IMAGE, f"oci-archive:{archives.oci_archive}:{IMAGE}")
    return archives


@pytest.fixture(scope="session")
def busybox_oci_archives(tmp_path_factory) -> OciArchives:
    work = tmp_path_factory.mktemp("buildah")
    try:
        return build_busybox_archives(work)
    except ToolUnavailable as e:
        pytest.skip(str(e))
    finally:
        # The vfs layers are plain copies owned by root: drop them now, the archives stay.
        for name in ("storage", "run", "files", "tmp"):
            shutil.rmtree(work / name, ignore_errors=True)
