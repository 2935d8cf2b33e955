"""Volumes on the host side (kvmpod/pod/volumes.py): --volume/--mount parsing, pod manifest volumes and
mounts, mountPoints matched by name, the one-line errors, START's VOLUME_MOUNT values, and the QEMU and
virtiofsd command lines (docs/volumes.md)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from kvmpod.cli.run import _parse_apps
from kvmpod.errors import ConfigError, UsageError
from kvmpod.image.manifest import MountPoint
from kvmpod.pod.podmanifest import parse_pod_manifest
from kvmpod.pod.volumes import (AppMount, Mount, PodVolumes, Volume, app_mounts, check_host_source, parse_mount,
                                parse_volume, pod_volumes, unique_volumes)
from kvmpod.pod.volumes import host_transport
from kvmpod.vm.config import FsDevice, NinePShare, VMConfig, qemu_argv
from kvmpod.vm.virtiofs import FsShare, virtiofsd_argv
from tests.unit.test_pod_manifest import POD


def test_volume_flags_parse_like_rkt():
    assert parse_volume("data,kind=host,source=/srv/data/,readOnly=true") == \
        Volume("data", "host", "/srv/data", read_only=True)
    assert parse_volume("scratch,kind=empty,mode=1777,uid=1000,gid=100") == \
        Volume("scratch", "empty", None, False, 0o1777, 1000, 100)
    assert parse_volume("s,kind=empty") == Volume("s", "empty", None, False, 0o755, 0, 0)
    assert parse_mount("volume=data,target=/var//lib/./data/") == Mount("data", "/var/lib/data")


@pytest.mark.parametrize("text, problem", [
    ("kind=empty", "--volume: 'kind=empty' has no volume name"),
    ("Data,kind=empty", "--volume: volume name 'Data' is not an AC Name"),
    ("d,kind=tmp", "--volume: volume d: kind must be host or empty, not 'tmp'"),
    ("d", "--volume: volume d: kind must be host or empty, not None"),
    ("d,kind=host", "--volume: volume d: kind=host needs source=/absolute/path"),
    ("d,kind=host,source=rel", "--volume: volume d: kind=host needs source=/absolute/path"),
    ("d,kind=host,source=/x,mode=0700", "--volume: volume d: mode applies to kind=empty only"),
    ("d,kind=empty,source=/x", "--volume: volume d: source applies to kind=host only"),
    ("d,kind=empty,mode=999", "--volume: mode='999' is not a valid octal mode"),
    ("d,kind=empty,uid=-1", "--volume: uid='-1' is not a valid number"),
    ("d,kind=empty,readOnly=maybe", "--volume: readOnly='maybe' is not true or false"),
    ("d,kind=empty,colour=red", "--volume: volume d: unknown key 'colour'"),
    ("d,kind=empty,owner=source", "--volume: volume d: owner applies to kind=host only"),
    ("d,kind=host,source=/x,owner=me", "--volume: volume d: owner must be source or UID:GID, not 'me'"),
    ("d,kind=host,source=/x,owner=1000", "--volume: volume d: owner must be source or UID:GID, not '1000'"),
    ("d,kind=empty,kind=host", "--volume: kind is given twice"),
    ("d,kind", "--volume: 'kind' is not key=value"),
])
def test_bad_volume_flags_are_one_line(text, problem):
    with pytest.raises(UsageError) as e:
        parse_volume(text)
    assert str(e.value) == problem


@pytest.mark.parametrize("text, problem", [
    ("volume=d", "--mount: 'volume=d' needs volume=NAME,target=PATH"),
    ("volume=d,target=rel", "--mount: target 'rel' is not an absolute path"),
    ("volume=d,target=/a/../b", "--mount: target '/a/../b' contains '..'"),
    ("volume=d,target=/", "--mount: target '/': a volume cannot replace the app's root"),
    ("volume=d,target=/x,readOnly=true", "--mount: unknown key 'readOnly' (it takes volume=NAME,target=PATH)"),
])
def test_bad_mount_flags_are_one_line(text, problem):
    with pytest.raises(UsageError) as e:
        parse_mount(text)
    assert str(e.value) == problem


def test_mount_is_an_app_flag():
    [a, b] = _parse_apps(["--mount", "volume=d,target=/d", "---", "img2", "--mount", "volume=e,target=/e"], "img1")
    assert a.mounts == [Mount("d", "/d")] and b.mounts == [Mount("e", "/e")]


VOLS = unique_volumes([Volume("data", "host", "/srv", read_only=False), Volume("ro", "empty", read_only=True),
                       Volume("tmp", "empty", mode=0o1777)])


def test_mount_points_are_matched_by_name_unless_mounts_are_explicit():
    points = [MountPoint("data", "/data", read_only=True), MountPoint("tmp", "/tmp"), MountPoint("cache", "/cache")]
    mounts, notices = app_mounts("web", VOLS, [], points)
    assert mounts == [AppMount(VOLS["data"], "/data", True), AppMount(VOLS["tmp"], "/tmp", False)]
    assert notices == ["app web: mount point cache (/cache) has no volume: not mounted"]
    # explicit mounts replace the matching; a mountPoint of the same name still makes it read-only
    mounts, notices = app_mounts("web", VOLS, [Mount("data", "/elsewhere"), Mount("ro", "/r")], points)
    assert mounts == [AppMount(VOLS["data"], "/elsewhere", True), AppMount(VOLS["ro"], "/r", True)]
    assert notices == []


@pytest.mark.parametrize("mounts, problem", [
    ([Mount("nope", "/n")], "app web: --mount volume=nope: no such volume (give --volume nope,...)"),
    ([Mount("data", "/a"), Mount("tmp", "/a")], "app web: mount targets overlap: /a (volume data) and /a (volume tmp)"),
    ([Mount("data", "/a/b"), Mount("tmp", "/a")], "app web: mount targets overlap: /a/b (volume data) and /a (volume tmp)"),
])
def test_bad_mounts_are_one_line(mounts, problem):
    with pytest.raises(UsageError) as e:
        app_mounts("web", VOLS, mounts, [])
    assert str(e.value) == problem


def test_mounts_beside_each_other_do_not_overlap():
    mounts, _ = app_mounts("web", VOLS, [Mount("data", "/a"), Mount("tmp", "/ab")], [])
    assert [m.target for m in mounts] == ["/a", "/ab"]


def test_volumes_defined_twice_are_refused():
    with pytest.raises(UsageError, match="^--volume: volume a is defined twice$"):
        unique_volumes([Volume("a", "empty"), Volume("a", "empty")])


def test_host_sources_must_be_real_directories(tmp_path: Path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "f").write_text("")
    (tmp_path / "l").symlink_to(tmp_path / "d")
    check_host_source(Volume("v", "host", str(tmp_path / "d")))
    for name, problem in (("missing", "no such directory"), ("f", "is not a directory"),
                          ("l", "is a symlink (give the real path)")):
        with pytest.raises(UsageError) as e:
            check_host_source(Volume("v", "host", str(tmp_path / name)))
        assert str(e.value) == f"--volume v: source {tmp_path / name}: {problem}"
    with pytest.raises(UsageError, match="its path goes through a symlink"):
        check_host_source(Volume("v", "host", str(tmp_path / "l" / "sub")))


def test_only_used_volumes_are_in_the_pod_and_host_ones_get_tags(tmp_path: Path):
    vols = unique_volumes([Volume("a", "host", str(tmp_path)), Volume("unused", "host", "/does/not/exist"),
                           Volume("e", "empty"), Volume("b", "host", str(tmp_path), read_only=True)])
    mounts = [[AppMount(vols["a"], "/a", False), AppMount(vols["e"], "/e", False)], [AppMount(vols["b"], "/b", True)]]
    pod = pod_volumes(vols, mounts)
    assert [v.name for v in pod.volumes] == ["a", "e", "b"] and [v.name for v in pod.host] == ["a", "b"]
    assert [pod.tag(v) for v in pod.volumes] == ["kvmpodvol0", "", "kvmpodvol1"]
    # START's VOLUME_MOUNT values
    assert mounts[0][0].field("kvmpodvol0") == "a:host:tag=kvmpodvol0:/a"
    assert mounts[0][1].field("") == "e:empty:mode=0755,uid=0,gid=0:/e"
    assert mounts[1][0].field("kvmpodvol1") == "b:host:tag=kvmpodvol1,ro,bindro:/b"
    assert AppMount(Volume("t", "empty", mode=0o1777, uid=5, gid=6), "/x:y", True).field("") == \
        "t:empty:mode=1777,uid=5,gid=6,bindro:/x:y"


def test_pod_manifest_volumes_and_mounts_are_accepted():
    pod = copy.deepcopy(POD)
    pod["volumes"] = [{"name": "work", "kind": "empty", "mode": "0700", "uid": 1, "gid": 2},
                      {"name": "src", "kind": "host", "source": "/srv", "readOnly": True}]
    pod["apps"][0]["mounts"] = [{"volume": "work", "path": "/work"}, {"volume": "src", "path": "/src"}]
    parsed = parse_pod_manifest(json.dumps(pod).encode())
    assert parsed.volumes == [Volume("work", "empty", None, False, 0o700, 1, 2), Volume("src", "host", "/srv", True)]
    assert parsed.apps[0].mounts == [Mount("work", "/work"), Mount("src", "/src")]
    assert parsed.app_overrides()[0].mounts == [Mount("work", "/work"), Mount("src", "/src")]
    assert parsed.apps[1].mounts == []


@pytest.mark.parametrize("change, problem", [
    ({"volumes": [{"name": "w", "kind": "empty", "mode": 448}]},
     'pod manifest: volumes[0]: mode must be an octal string like "0755"'),
    ({"volumes": [{"name": "w", "kind": "nfs"}]}, "pod manifest: volumes[0]: volume w: kind must be host or empty, not 'nfs'"),
    ({"volumes": [{"name": "w", "kind": "empty"}, {"name": "w", "kind": "empty"}]},
     "pod manifest: volumes: volume w is defined twice"),
    ({"apps": [{**POD["apps"][0], "mounts": [{"volume": "w", "path": "rel"}]}]},
     "pod manifest: apps[0].mounts[0]: target 'rel' is not an absolute path"),
    ({"apps": [{**POD["apps"][0], "mounts": [{"volume": "w"}]}]},
     "pod manifest: apps[0].mounts[0]: a mount is an object with volume and path"),
])
def test_bad_pod_manifest_volumes_are_one_line(change, problem):
    pod = copy.deepcopy(POD)
    pod.update(change)
    with pytest.raises(UsageError) as e:
        parse_pod_manifest(json.dumps(pod).encode())
    assert str(e.value) == problem


def _config(machine: str, filesystems: list[FsDevice]) -> VMConfig:
    return VMConfig(name="p", kernel=Path("/k"), initrd=Path("/i"), cmdline="", console_log=Path("/c"),
                    machine=machine, memory_mib=300, filesystems=filesystems)


def test_qemu_argv_shares_memory_only_with_host_volumes():
    plain = qemu_argv(_config("microvm", []))
    assert not any("memory-backend" in a or "vhost-user-fs" in a for a in plain)
    argv = qemu_argv(_config("microvm", [FsDevice("kvmpodvol0", Path("/run/p/kvmpodvol0.sock"))]))
    assert argv[argv.index("-machine") + 1] == "microvm,memory-backend=mem"
    assert "memory-backend-memfd,id=mem,size=300M,share=on" in argv
    assert "virtio-mmio.force-legacy=false" in argv  # libvhost-user refuses legacy virtio-mmio
    assert "socket,id=fs0,path=/run/p/kvmpodvol0.sock" in argv
    assert "vhost-user-fs-device,chardev=fs0,tag=kvmpodvol0" in argv
    pc = qemu_argv(_config("pc", [FsDevice("kvmpodvol0", Path("/s"))]))
    assert "vhost-user-fs-pci,chardev=fs0,tag=kvmpodvol0" in pc and "virtio-mmio.force-legacy=false" not in pc


def test_virtiofsd_is_sandboxed_to_the_source():
    argv = virtiofsd_argv(Path("/usr/lib/qemu/virtiofsd"), FsShare("kvmpodvol0", Path("/srv"), Path("/p/s.sock")))
    assert argv[:2] == ["/usr/lib/qemu/virtiofsd", "--socket-path=/p/s.sock"]
    assert "source=/srv" in argv and "sandbox=namespace" in argv


def test_pod_volumes_default_is_empty():
    assert PodVolumes().volumes == [] and PodVolumes().host == []


def test_host_volumes_fall_back_to_9p_without_root_or_virtiofsd(monkeypatch):
    monkeypatch.delenv("KVMPOD_VOLUME_TRANSPORT", raising=False)
    assert host_transport(True, True) == ("virtiofs", None)
    assert host_transport(True, False) == ("9p", "host volumes use virtio-9p (virtiofsd needs root): "
                                                 "file owners are not kept")
    assert host_transport(False, True) == ("9p", "host volumes use virtio-9p (virtiofsd is not installed)")
    monkeypatch.setenv("KVMPOD_VOLUME_TRANSPORT", "9p")
    assert host_transport(True, True) == ("9p", None)
    monkeypatch.setenv("KVMPOD_VOLUME_TRANSPORT", "nfs")
    with pytest.raises(UsageError, match="^KVMPOD_VOLUME_TRANSPORT='nfs': use virtiofs or 9p$"):
        host_transport(True, True)


def test_the_volume_transport_setting_chooses_and_the_environment_wins(tmp_path, monkeypatch):
    conf = tmp_path / "kvmpod.toml"
    monkeypatch.setenv("KVMPOD_CONFIG", str(conf))
    monkeypatch.delenv("KVMPOD_VOLUME_TRANSPORT", raising=False)
    conf.write_text('[run]\nvolume-transport = "auto"\n')
    assert host_transport(True, True) == ("virtiofs", None)
    conf.write_text('[run]\nvolume-transport = "9p"\n')   # root's pods with volumes from a boot snapshot
    assert host_transport(True, True) == ("9p", None)
    monkeypatch.setenv("KVMPOD_VOLUME_TRANSPORT", "virtiofs")
    assert host_transport(True, True) == ("virtiofs", None)
    monkeypatch.delenv("KVMPOD_VOLUME_TRANSPORT")
    conf.write_text('[run]\nvolume-transport = "nfs"\n')
    with pytest.raises(ConfigError, match=r"^\[run\] volume-transport in .*kvmpod.toml: 'nfs' is not one of "
                                          r"auto, virtiofs, 9p$"):
        host_transport(True, True)


def test_9p_shares_are_served_by_qemu():
    cfg = VMConfig(name="p", kernel=Path("/k"), initrd=Path("/i"), cmdline="", console_log=Path("/c"),
                   machine="microvm", shares_9p=[NinePShare("kvmpodvol0", Path("/srv"), True)])
    argv = qemu_argv(cfg)
    assert "local,id=p90,path=/srv,security_model=passthrough,readonly=on" in argv
    assert "virtio-9p-device,fsdev=p90,mount_tag=kvmpodvol0" in argv
    assert not any("memory-backend" in a for a in argv)  # no shared memory needed
    assert AppMount(Volume("v", "host", "/srv", True), "/v", True).field("kvmpodvol0", "9p") == \
        "v:host:tag=kvmpodvol0,9p,ro,bindro:/v"


def test_a_host_volumes_owner_is_the_source_dirs_or_given(tmp_path: Path):
    """owner= (docs/volumes.md): whose the files the guest's root writes are on the host."""
    from kvmpod.pod.volumes import host_owner

    src = tmp_path / "src"
    src.mkdir()
    os.chown(src, 4242, 4343) if os.geteuid() == 0 else None
    st = src.stat()
    assert host_owner(parse_volume(f"s,kind=host,source={src},owner=source")) == (
        None if (st.st_uid, st.st_gid) == (0, 0) else (st.st_uid, st.st_gid))
    assert host_owner(parse_volume(f"s,kind=host,source={src},owner=1001:1002")) == (1001, 1002)
    assert host_owner(parse_volume(f"s,kind=host,source={src},owner=0:0")) is None   # root: nothing to map
    assert host_owner(parse_volume(f"s,kind=host,source={src}")) is None
    with pytest.raises(UsageError, match="owner 70000:1 is beyond 65535"):
        host_owner(parse_volume(f"s,kind=host,source={src},owner=70000:1"))


def test_an_owned_volumes_virtiofsd_runs_as_its_owner_in_a_user_namespace():
    from kvmpod.vm.virtiofs import id_map

    share = FsShare("kvmpodvol0", Path("/srv"), Path("/p/s.sock"), read_only=True, owner=(4242, 4343))
    argv = virtiofsd_argv(Path("/usr/lib/qemu/virtiofsd"), share, listen_fd=7)
    assert argv[:6] == ["setpriv", "--reuid=4242", "--regid=4343", "--clear-groups", "--pdeathsig=SIGKILL",
                        "unshare"]
    assert argv[6:8] == ["--user", "--"] and "unshare" in argv[12:] and "--mount" in argv[12:]  # then ro's bind
    assert "--fd=7" in argv and not any(a.startswith("--socket-path") for a in argv)
    assert id_map(4242) == "0 4242 1\n1 1 4241\n4243 4243 61293\n"
    assert id_map(1) == "0 1 1\n2 2 65534\n"
    assert id_map(65535) == "0 65535 1\n1 1 65534\n"

