"""kvmpod's own QEMU: the build's inputs and checks (kvmpod/vm/qemu_build.py) and which binary pods run
(kvmpod/vm/qemu_binary.py). The build itself runs in `make setup`; every e2e test then boots with it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kvmpod.boot import kcache
from kvmpod.errors import VMError
from kvmpod.vm import qemu_binary, qemu_build
from kvmpod.vm.qemu_binary import find_qemu


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch, tmp_path):
    monkeypatch.delenv("KVMPOD_QEMU", raising=False)
    monkeypatch.setenv("KVMPOD_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    find_qemu.cache_clear()
    yield
    find_qemu.cache_clear()


def executable(path: Path, text: str = "#!/bin/sh\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_build(cache: Path, debian_identity: dict | None, name: str = "kvmpod-qemu-7.2-abcdef12") -> Path:
    entry = cache / "qemu" / name
    executable(entry / "qemu-system-x86_64")
    (entry / "qemu.json").write_text(json.dumps({"build_sha256": "abcdef12" * 8, "debian_binary": debian_identity}))
    return entry


def test_the_hash_covers_version_features_and_devices():
    base = qemu_build.build_hash("1:7.2+dfsg-7")
    assert base == qemu_build.build_hash("1:7.2+dfsg-7")
    assert base != qemu_build.build_hash("1:7.2+dfsg-7+deb12u1")
    assert base != qemu_build.build_hash("1:7.2+dfsg-7", features=(*qemu_build.FEATURES, "--enable-seccomp"))
    assert base != qemu_build.build_hash("1:7.2+dfsg-7", devices=qemu_build.DEVICES + "CONFIG_VIRTIO_SCSI=y\n")
    assert base != qemu_build.build_hash("1:7.2+dfsg-7", patches=[])
    ours = qemu_build.read_patches()
    assert base == qemu_build.build_hash("1:7.2+dfsg-7", patches=ours)
    assert base != qemu_build.build_hash("1:7.2+dfsg-7", patches=[(name, data + b"\n") for name, data in ours])


def test_kvmpods_qemu_patches_are_unified_diffs_in_the_package():
    patches = kcache.find_patches(qemu_build.PATCH_DIR)
    assert [p.name for p in patches][:1] == ["0001-tcg-x-kvmpod-tb-flush-gives-the-translation-buffer-back.patch"]
    for patch in patches:
        text = patch.read_text()
        assert "\n--- a/" in text and "\n+++ b/" in text and "\n@@ " in text, patch
        assert text.split("\n", 1)[0].startswith("kvmpod: "), f"{patch.name}: the first line says what it does"


def test_dir_name_drops_the_epoch():
    assert qemu_build.dir_name("1:7.2+dfsg-7+deb12u18", "0123456789ab") == "kvmpod-qemu-7.2+dfsg-7+deb12u18-01234567"


def test_host_sources_become_deb_src_entries():
    deb822 = ("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
              "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    out = qemu_build.deb_src_sources(deb822, deb822=True)
    assert out.splitlines()[0] == "Types: deb-src"
    assert "URIs: http://deb.debian.org/debian" in out and "Signed-By:" in out
    one_line = "deb [arch=amd64] http://mirror.example/debian bookworm main\n# deb http://old/ x main\ndeb-src http://a/ b c\n"
    assert qemu_build.deb_src_sources(one_line, deb822=False) == "deb-src [arch=amd64] http://mirror.example/debian bookworm main\n"


def test_the_device_list_is_a_kconfig_file_of_y_settings():
    for line in qemu_build.DEVICES.splitlines():
        assert line.startswith("#") or line.endswith(("=y", "=n")), line


def test_a_binary_lacking_a_device_is_refused_by_name(tmp_path):
    machines = "Supported machines are:\nmicrovm              microvm (i386)\npc                   Standard PC\n"
    devices = "".join(f'name "{d}", bus virtio-bus\n' for d in qemu_build.REQUIRED_DEVICES if d != "vhost-vsock-pci")
    fake = executable(tmp_path / "qemu", "#!/bin/sh\n"
                      f"if [ \"$1\" = -machine ]; then printf '%s' '{machines}'; else printf '%s' '{devices}'; fi\n")
    assert qemu_build.missing_capabilities(fake) == ["device vhost-vsock-pci"]


def test_installed_build_needs_the_same_hash_and_the_binary(tmp_path):
    entry = fake_build(tmp_path, None)
    root = tmp_path / "qemu"
    assert qemu_build.installed_build(root, "abcdef12" * 8) == entry
    assert qemu_build.installed_build(root, "abcdef12" + "0" * 56) is None
    (entry / "qemu-system-x86_64").unlink()
    assert qemu_build.installed_build(root, "abcdef12" * 8) is None


def test_pods_run_kvmpods_build_when_it_matches_the_installed_debian_qemu(tmp_path, monkeypatch):
    debian = executable(tmp_path / "usr/bin/qemu-system-x86_64")
    monkeypatch.setattr(qemu_binary, "DEBIAN_QEMU", debian)
    monkeypatch.setenv("PATH", str(debian.parent))
    entry = fake_build(tmp_path / "cache", qemu_binary.binary_identity(debian))
    choice = find_qemu(tmp_path / "cache")
    assert (choice.path, choice.source, choice.notice) == (entry / "qemu-system-x86_64", "kvmpod's build", None)


def test_a_build_for_another_debian_qemu_is_passed_over_with_a_notice(tmp_path, monkeypatch):
    debian = executable(tmp_path / "usr/bin/qemu-system-x86_64")
    monkeypatch.setattr(qemu_binary, "DEBIAN_QEMU", debian)
    monkeypatch.setenv("PATH", str(debian.parent))
    identity = qemu_binary.binary_identity(debian)
    fake_build(tmp_path / "cache", {**identity, "mtime_ns": identity["mtime_ns"] - 1})  # apt upgraded it since
    choice = find_qemu(tmp_path / "cache")
    assert choice.path == debian and choice.source == "PATH"
    assert "kvmpod setup --qemu-only" in choice.notice and "kvmpod-qemu-7.2-abcdef12" in choice.notice


def test_without_a_build_pods_run_qemu_from_path(tmp_path, monkeypatch):
    debian = executable(tmp_path / "bin/qemu-system-x86_64")
    monkeypatch.setenv("PATH", str(debian.parent))
    assert find_qemu(tmp_path / "cache") == qemu_binary.QemuChoice(debian, "PATH")


def test_no_qemu_at_all_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(VMError, match=r"^qemu-system-x86_64: not found \(apt-get install qemu-system-x86\)$"):
        find_qemu(tmp_path / "cache")


def test_the_environment_and_the_config_file_override_the_build(tmp_path, monkeypatch):
    fake_build(tmp_path / "cache", None)
    mine = executable(tmp_path / "my-qemu")
    conf = tmp_path / "kvmpod.toml"
    conf.write_text('qemu = "my-qemu"\n')
    monkeypatch.setenv("KVMPOD_CONFIG", str(conf))
    assert find_qemu(tmp_path / "cache") == qemu_binary.QemuChoice(mine, f"qemu in {conf}")
    find_qemu.cache_clear()
    other = executable(tmp_path / "other")
    monkeypatch.setenv("KVMPOD_QEMU", str(other))
    assert find_qemu(tmp_path / "cache") == qemu_binary.QemuChoice(other, "$KVMPOD_QEMU")


@pytest.mark.parametrize("name", ["missing", "not-executable", "a-directory"])
def test_an_explicit_binary_must_be_an_executable_file(name, tmp_path, monkeypatch):
    (tmp_path / "not-executable").write_text("")
    (tmp_path / "a-directory").mkdir()
    value = str(tmp_path / name)
    monkeypatch.setenv("KVMPOD_QEMU", value)
    with pytest.raises(VMError, match=rf"^QEMU binary {value} \(\$KVMPOD_QEMU\): not an executable file$"):
        find_qemu(tmp_path / "cache")


def test_the_build_is_what_pods_run_here():
    """On a machine set up by `make setup`, kvmpod's build is installed and is the default."""
    if os.environ.get("KVMPOD_QEMU"):
        pytest.skip("KVMPOD_QEMU overrides the choice in this run")
    choice = find_qemu()
    assert choice.source == "kvmpod's build", f"pods would run {choice.path} ({choice.source}): run `make qemu`"
    assert qemu_build.missing_capabilities(choice.path) == []
