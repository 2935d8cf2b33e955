"""The guest sees an image's rootfs exactly as its tar says: modes, owners, links, names, depth, sizes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.e2e.conftest import stderr_lines

MTIME = 1_700_000_000
BIG = 64 * 1024 * 1024
LONG_NAME = "L" * 248 + ".long"  # 253 bytes: the most Linux isofs shows (docs/disk.md)
DEEP = "/".join(f"d{i:02}" for i in range(20))


def _file(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
          kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(f"rootfs/t/{name}" if name else "rootfs/t")
    info.type, info.mode, info.uid, info.gid, info.mtime, info.linkname = kind, mode, uid, gid, MTIME, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def _special_entries() -> list[tuple[tarfile.TarInfo, bytes]]:
    big = bytes(range(256)) * (BIG // 256)
    entries = [
        _file("", mode=0o755, kind=tarfile.DIRTYPE),
        _file("setuid", b"#!/bin/sh\n", 0o4755),
        _file("setgid-dir", mode=0o2775, gid=1000, kind=tarfile.DIRTYPE),
        _file("sticky", mode=0o1777, kind=tarfile.DIRTYPE),
        _file("owned-1000", b"a", 0o600, 1000, 1000),
        _file("owned-nobody", b"b", 0o640, 65534, 65534),
        _file("empty", b""),
        _file("big", big),
        _file("hard", b"same inode\n", 0o444, 1000, 1000),
        _file("hard-2", kind=tarfile.LNKTYPE, link="rootfs/t/hard", mode=0o444, uid=1000, gid=1000),
        _file("sym-rel", kind=tarfile.SYMTYPE, link="hard", mode=0o777),
        _file("sym-abs", kind=tarfile.SYMTYPE, link="/etc/passwd", mode=0o777),
        _file("sym-dangling", kind=tarfile.SYMTYPE, link="../nowhere/at/all", mode=0o777),
        _file(LONG_NAME, b"long\n"),
    ]
    path = ""
    for part in DEEP.split("/"):
        path = f"{path}/{part}" if path else part
        entries.append(_file(path, mode=0o750, kind=tarfile.DIRTYPE))
    entries.append(_file(f"{DEEP}/leaf", b"deep\n", 0o600, 1000, 1000))
    return entries


@pytest.fixture(scope="module")
def fidelity_aci(busybox_rootfs, tmp_path_factory) -> tuple[Path, list[tarfile.TarInfo]]:
    out = tmp_path_factory.mktemp("fidelity") / "fidelity.aci"
    manifest = json.dumps({"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/fidelity",
                           "app": {"exec": ["/bin/sh"], "user": "0", "group": "0"}}).encode()
    entries = _special_entries()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        tar.add(busybox_rootfs, arcname="rootfs")
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out, [info for info, _ in entries]


GUEST_SCRIPT = r"""
cd /t && find . -mindepth 1 | sort | while IFS= read -r f; do
  stat -c '%n|%a|%u|%g|%s|%Y|%F' "$f"
done
echo ===
find . -type f | sort | while IFS= read -r f; do sha256sum "$f"; done
echo ===
for l in sym-rel sym-abs sym-dangling; do echo "$l|$(readlink $l)"; done
echo ===
stat -c '%i' hard hard-2
"""


def test_guest_sees_the_rootfs_exactly_as_the_tar(kvmpod, fidelity_aci):
    aci, infos = fidelity_aci
    result = kvmpod.run("--memory", "512M", str(aci), "--exec", "/bin/sh", "--", "-c", GUEST_SCRIPT)
    assert result.returncode == 0, stderr_lines(result)
    stats, sums, links, inodes = result.stdout.decode().split("===\n")

    seen = {}
    for line in stats.splitlines():
        name, mode, uid, gid, size, mtime, kind = line.rsplit("|", 6)
        seen[name.removeprefix("./")] = (mode, int(uid), int(gid), int(size), int(mtime), kind)
    by_name = {i.name.removeprefix("rootfs/t/"): i for i in infos if i.name != "rootfs/t"}
    assert set(seen) == set(by_name)
    for name, info in by_name.items():
        if info.islnk():
            info = by_name["hard"]
        mode, uid, gid, size, mtime, kind = seen[name]
        expected_kind = {tarfile.DIRTYPE: "directory", tarfile.SYMTYPE: "symbolic link"}.get(info.type, "regular")
        assert kind.startswith(expected_kind), (name, kind)
        if not info.issym():  # symlink modes are always 777 on Linux
            assert (mode, uid, gid) == (format(info.mode, "o"), info.uid, info.gid), name
        assert mtime == MTIME, name
        if info.isreg():
            assert size == info.size, name

    guest_sums = {line.split(maxsplit=1)[1].removeprefix("./"): line.split()[0] for line in sums.splitlines()}
    assert guest_sums["big"] == hashlib.sha256(bytes(range(256)) * (BIG // 256)).hexdigest()
    assert guest_sums["empty"] == hashlib.sha256(b"").hexdigest()
    assert guest_sums["hard"] == guest_sums["hard-2"] == hashlib.sha256(b"same inode\n").hexdigest()
    assert guest_sums[LONG_NAME] == hashlib.sha256(b"long\n").hexdigest()
    assert guest_sums[f"{DEEP}/leaf"] == hashlib.sha256(b"deep\n").hexdigest()
    assert dict(line.split("|") for line in links.splitlines()) == {
        "sym-rel": "hard", "sym-abs": "/etc/passwd", "sym-dangling": "../nowhere/at/all"}
