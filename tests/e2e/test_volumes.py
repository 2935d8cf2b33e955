"""Volumes end to end (docs/volumes.md): kind=empty shared by the apps of a pod, kind=host over
virtio-fs both ways, read-only volumes, mountinfo, and the errors. Real VMs, few boots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from kvmpod.image.build import build_aci
from kvmpod.image.manifest import MountPoint, build_manifest
import pytest

from tests.e2e.conftest import Kvmpod, the_error

# app "writer" writes to the shared volume; app "reader" (mounting it by its image's mountPoint)
# waits for the file, then reports what it sees
WRITER = 'echo from-writer > /shared/w.tmp && mv /shared/w.tmp /shared/w && ln /shared/w /shared/w2 && echo writer-ok'
READER = ('i=0; while [ ! -e /by-name/w ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; '
          'echo "content $(cat /by-name/w)"; echo "links $(stat -c %h /by-name/w)"; '
          'echo "root $(stat -c "%u:%g %a" /by-name)"; echo "parent $(stat -c "%u:%g %a" /deep)"; '
          'grep " /by-name " /proc/self/mountinfo | sed "s/^/mi /"; grep " /deep/ro " /proc/self/mountinfo | sed "s/^/mi /"; '
          'touch /deep/ro/x 2>&1 | sed "s/^/ro /"; exit 0')


def test_empty_volume_shared_by_two_apps_with_mode_uid_gid_and_a_read_only_mount(kvmpod, busybox_rootfs, tmp_path):
    reader = tmp_path / "reader.aci"
    build_aci(busybox_rootfs, build_manifest("example.com/reader", exec_=["/bin/sh", "-c", READER],
                                             mount_points=[MountPoint("shared", "/by-name"),
                                                           MountPoint("frozen", "/deep/ro", read_only=True)]), reader)
    writer = tmp_path / "writer.aci"
    build_aci(busybox_rootfs, build_manifest("example.com/writer", exec_=["/bin/sh", "-c", WRITER]), writer)
    result = kvmpod.run("--volume", "shared,kind=empty,mode=1770,uid=1000,gid=100", "--volume", "frozen,kind=empty",
                        str(writer), "--mount", "volume=shared,target=/shared", "---", str(reader))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert "writer-ok" in lines and "content from-writer" in lines and "links 2" in lines
    assert "root 1000:100 1770" in lines      # the tmpfs root has the volume's mode, uid and gid
    assert "parent 0:0 755" in lines          # a missing mount point's parent is created 0:0 0755
    mountinfo = [line.split() for line in lines if line.startswith("mi ")]
    assert [m[5] for m in mountinfo] == ["/by-name", "/deep/ro"]  # real mount points, seen from the app
    assert mountinfo[0][6].startswith("rw,") and mountinfo[1][6].startswith("ro,")
    assert any(line.startswith("ro ") and "Read-only file system" in line for line in lines)


HOST_SCRIPT = ('ls -ln /h | sed -n "s/^\\(-[^ ]*\\) *[0-9]* *\\([0-9]*\\) *\\([0-9]*\\).* from-host$/seen \\1 \\2 \\3/p"; '
               'echo "read $(cat /h/from-host)"; '
               'echo data > /h/new && chown 1234:5678 /h/new && chmod 4750 /h/new && '
               'mkdir -m 1777 /h/sticky && ln /h/new /h/link && mv /h/link /h/moved && '
               'dd if=/dev/zero of=/h/synced bs=4k count=4 conv=fsync 2>/dev/null && echo written; '
               'touch /ro/x 2>&1 | sed "s/^/ro /"; echo "ro-read $(cat /ro/from-host)"; '
               'grep -E " /h | /ro " /proc/self/mountinfo | sed "s/^/mi /"')


@pytest.mark.parametrize("transport", ["virtiofs", "9p"])
def test_host_volume_round_trip_and_a_read_only_host_volume(kvmpod_env, busybox_aci, tmp_path, transport):
    kvmpod = Kvmpod({**kvmpod_env, "KVMPOD_VOLUME_TRANSPORT": transport})  # as root: virtiofs unless forced
    share = tmp_path / "share"
    share.mkdir()
    (share / "from-host").write_text("hello\n")
    os.chown(share / "from-host", 4321, 765)
    os.chmod(share / "from-host", 0o640)
    frozen = tmp_path / "frozen"
    shutil.copytree(share, frozen)
    result = kvmpod.run("--volume", f"h,kind=host,source={share}", "--volume", f"ro,kind=host,source={frozen},readOnly=true",
                        str(busybox_aci), "--mount", "volume=h,target=/h", "--mount", "volume=ro,target=/ro",
                        "--exec", "/bin/sh", "--", "-c", HOST_SCRIPT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert "seen -rw-r----- 4321 765" in lines and "read hello" in lines and "written" in lines
    st = os.stat(share / "new")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_nlink) == (1234, 5678, 0o4750, 2)
    assert (share / "new").read_text() == "data\n" and os.path.samefile(share / "new", share / "moved")
    assert os.stat(share / "sticky").st_mode & 0o7777 == 0o1777
    assert (share / "synced").stat().st_size == 16384
    assert any(line.startswith("ro ") and "Read-only file system" in line for line in lines)
    assert "ro-read hello" in lines and sorted(os.listdir(frozen)) == ["from-host"]
    mountinfo = {m[5]: m for m in (line.split() for line in lines if line.startswith("mi "))}
    assert set(mountinfo) == {"/h", "/ro"} and mountinfo["/ro"][6].startswith("ro,")
    assert all(m[m.index("-") + 1] == transport for m in mountinfo.values())


def test_volume_errors_are_one_line(kvmpod, busybox_aci, busybox_rootfs, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    (tmp_path / "file").write_text("")
    cases = [
        (["--volume", f"v,kind=host,source={tmp_path}/missing"], f"source {tmp_path}/missing: no such directory"),
        (["--volume", f"v,kind=host,source={tmp_path}/link"], f"source {tmp_path}/link: is a symlink"),
        (["--volume", f"v,kind=host,source={tmp_path}/file"], f"source {tmp_path}/file: is not a directory"),
        (["--volume", "v,kind=tmp"], "kind must be host or empty, not 'tmp'"),
    ]
    for flags, problem in cases:
        result = kvmpod.run(*flags, str(busybox_aci), "--mount", "volume=v,target=/v")
        assert result.returncode == 125 and problem in the_error(result), (flags, result.stderr)
    result = kvmpod.run("--volume", "v,kind=empty", str(busybox_aci), "--mount", "volume=v,target=/a",
                        "--mount", "volume=v,target=/a/b")
    assert the_error(result) == "kvmpod: error: app busybox: mount targets overlap: /a (volume v) and /a/b (volume v)"
    # a symlink on the way to a target in the image is refused by the agent (it would lead the mount out)
    rootfs = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", str(busybox_rootfs), str(rootfs)], check=True)
    (rootfs / "escape").symlink_to("/tmp")
    aci = tmp_path / "sym.aci"
    build_aci(rootfs, build_manifest("example.com/sym", exec_=["/bin/true"]), aci)
    result = kvmpod.run("--volume", "v,kind=empty", str(aci), "--mount", "volume=v,target=/escape/v")
    assert result.returncode == 125
    assert "volume target /escape/v: escape is a symlink in the app's rootfs" in the_error(result)


@pytest.mark.parametrize("transport", ["virtiofs", "9p"])
def test_a_host_volume_whose_path_holds_commas_and_equals_signs(kvmpod_env, busybox_aci, tmp_path, transport):
    """Only a pod manifest can name such a path (--volume splits at commas, as rkt's does). virtiofsd
    and QEMU both split their options at commas: the path reaches them escaped, so the pod sees
    exactly this directory and no option such as sandbox=none is injected (docs/volumes.md)."""
    from tests.e2e.test_pod_manifest import fetch

    share = tmp_path / "a,sandbox=none,b=c"
    share.mkdir()
    (share / "from-host").write_text("hello\n")
    (tmp_path / "a").mkdir()  # what an unescaped path would have exported instead
    manifest = tmp_path / "pod.json"
    manifest.write_text(json.dumps({
        "acKind": "PodManifest", "acVersion": "0.8.11",
        "apps": [{"name": "app", "image": {"id": fetch(kvmpod_env, busybox_aci)},
                  "app": {"exec": ["/bin/sh", "-c", 'echo "read $(cat /h/from-host)"; echo back > /h/from-guest'],
                          "user": "0", "group": "0"},
                  "mounts": [{"volume": "h", "path": "/h"}]}],
        "volumes": [{"name": "h", "kind": "host", "source": str(share)}],
    }))
    result = Kvmpod({**kvmpod_env, "KVMPOD_VOLUME_TRANSPORT": transport}).run("--pod-manifest", str(manifest))
    assert result.returncode == 0, result.stderr
    assert "read hello" in result.stdout.decode().splitlines()
    assert (share / "from-guest").read_text() == "back\n" and os.listdir(tmp_path / "a") == []
