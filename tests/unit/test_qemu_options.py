"""Values in QEMU's and virtiofsd's option lists (kvmpod/vm/config.py, kvmpod/vm/virtiofs.py): a path
or name holding `,`, `=` or `\\` stays one value and can never add an option (docs/volumes.md).

Checked against models of both parsers, and against the real binaries where they are installed
(neither starts a VM: QEMU runs `-machine none`, virtiofsd stops at the missing source)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmpod.vm.config import Disk, FsDevice, NinePShare, VMConfig, opt_value, qemu_argv
from kvmpod.vm.virtiofs import FsShare, fuse_opt_value, virtiofsd_argv

TRICKY = "/srv/a,b/x=y/sandbox=none,,c"
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")


def qemu_opts(text: str) -> list[tuple[str, str]]:
    """QemuOpts/keyval's split of `key=value,...`: at single commas, `,,` a literal comma."""
    items, current, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current, i = current + ",", i + 2
                continue
            items.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    items.append(current)
    return [tuple(item.split("=", 1)) if "=" in item else (item, "") for item in items]


def fuse_opts(text: str) -> list[str]:
    """libfuse's split of a -o list: at commas; a backslash takes the next character literally."""
    items, current, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            current, i = current + text[i + 1], i + 2
            continue
        if text[i] == ",":
            items.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    items.append(current)
    return items


def _cfg(tricky: Path, **kw) -> VMConfig:
    base = dict(name=f"kvmpod-{tricky.name}", kernel=Path("/k"), initrd=Path("/i"), cmdline="c",
                console_log=tricky / "console.log", qmp_fd=3)
    return VMConfig(**{**base, **kw})


def _value_after(argv: list[str], flag: str, prefix: str) -> list[tuple[str, str]]:
    """The parsed options of the `flag` argument that starts with `prefix`."""
    found = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag and argv[i + 1].startswith(prefix)]
    assert len(found) == 1, (flag, prefix, argv)
    return qemu_opts(found[0])


def test_opt_value_doubles_commas_only():
    assert opt_value("/a,b=c") == "/a,,b=c"
    assert opt_value(Path("/plain")) == "/plain"
    assert qemu_opts(f"path={opt_value(TRICKY)},id=x") == [("path", TRICKY), ("id", "x")]


def test_every_path_name_and_tag_in_qemus_argv_stays_one_value():
    d = Path(TRICKY)
    argv = qemu_argv(_cfg(d, agent_transport="vsock-user", vhost_user_vsock=d / "vhost.sock",
                          disks=[Disk(d / "root.iso", "ser,ial=1")],
                          filesystems=[FsDevice("tag,x=1", d / "fs.sock")],
                          shares_9p=[NinePShare("nine,y=2", d / "share", read_only=True)]))
    snapshot = qemu_argv(_cfg(d, memory_file=d / "ram"))  # a snapshot's VM has no vhost-user device
    assert _value_after(argv, "-name", "guest=") == [("guest", f"kvmpod-{d.name}"), ("debug-threads", "on")]
    assert ("path", f"{d}/console.log") in _value_after(argv, "-chardev", "file,id=console")
    assert ("path", f"{d}/vhost.sock") in _value_after(argv, "-chardev", "socket,id=vsock")
    assert _value_after(argv, "-drive", "file=")[0] == ("file", f"{d}/root.iso")
    assert ("serial", "ser,ial=1") in _value_after(argv, "-device", "virtio-blk-pci")
    assert ("mem-path", f"{d}/ram") in _value_after(snapshot, "-object", "memory-backend-file")
    assert ("path", f"{d}/fs.sock") in _value_after(argv, "-chardev", "socket,id=fs0")
    assert ("tag", "tag,x=1") in _value_after(argv, "-device", "vhost-user-fs-pci")
    nine = _value_after(argv, "-fsdev", "local,id=p90")
    assert ("path", f"{d}/share") in nine and ("readonly", "on") in nine and len(nine) == 5
    assert ("mount_tag", "nine,y=2") in _value_after(argv, "-device", "virtio-9p-pci")
    # options that are not option lists get the value as it is
    assert argv[argv.index("-kernel") + 1] == "/k"


def test_virtiofsd_source_is_escaped_for_fuse_opt():
    for source in ("/srv/a,b", "/srv/x=y", "/srv/back\\slash", "/srv/trailing\\", "/srv/o\\101ct",
                   "/srv/a,sandbox=none", "/srv/c\\,d"):
        argv = virtiofsd_argv(VIRTIOFSD, FsShare("kvmpodvol0", Path(source), Path("/p/s.sock")))
        option = argv[argv.index("-o") + 1]
        assert fuse_opts(option) == [f"source={source}"], option
    assert fuse_opt_value("/a,b\\c") == "/a\\,b\\\\c"


@pytest.mark.skipif(not (os.access(VIRTIOFSD, os.X_OK) and os.geteuid() == 0),
                    reason="virtiofsd (as root) not available")
def test_the_real_virtiofsd_reads_the_source_back_exactly(tmp_path):
    """virtiofsd stats its source before anything else and names it when it is missing: so the value
    it parsed out of `-o source=...` is visible without starting a sandbox or a VM."""
    for name in ("a,b", "x=y", "back\\slash", "trailing\\", "o\\101ct", "e,sandbox=none"):
        source = tmp_path / "missing" / name
        argv = virtiofsd_argv(VIRTIOFSD, FsShare("kvmpodvol0", source, tmp_path / "s.sock"))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        found = re.search(r'failed to stat source \("(.*)"\)', done.stderr)
        assert found and found.group(1) == str(source), done.stderr


QEMU = shutil.which("qemu-system-x86_64")


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_the_real_qemu_parses_escaped_values_back(tmp_path):
    d = tmp_path / "a,b=c"
    d.mkdir()
    (d / "disk=1.img").write_bytes(b"\0" * 4096)
    argv = qemu_argv(_cfg(d, disks=[Disk(d / "disk=1.img", "s,1")]), binary=QEMU)
    wanted = {"-name", "-chardev", "-drive"}  # the values under test, on a machine that runs nothing
    keep = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"]
    for i, arg in enumerate(argv[:-1]):
        if arg in wanted and not argv[i + 1].startswith("socket,"):
            keep += [arg, argv[i + 1]]
    commands = "".join(json.dumps({"execute": c}) for c in ("qmp_capabilities", "query-name", "query-block", "quit"))
    done = subprocess.run(keep, input=commands, capture_output=True, text=True, timeout=30)
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    results = [r["return"] for r in replies if "return" in r]
    assert {"name": f"kvmpod-{d.name}"} in results, done.stdout + done.stderr
    blocks = next(r for r in results if isinstance(r, list) and r)
    assert blocks[0]["inserted"]["file"] == str(d / "disk=1.img")
    assert (d / "console.log").exists()  # the console chardev's file, made where the path says
