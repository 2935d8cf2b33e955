"""`kvmpod setup` without building anything: the Debian build dependencies it checks (a dpkg-query stand-in
on PATH says what is installed), which caches count, the options, the sample kvmpod.toml's keys."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from kvmpod import provision
from tests.conftest import REPO, kvmpod_cmd

FAKE_DPKG_QUERY = """#!/bin/sh
# dpkg-query -W -f=FORMAT PKG...: every package is installed except those in $MISSING
shift 2
for p in "$@"; do
  case " $MISSING " in *" $p "*) echo "dpkg-query: no packages found matching $p" >&2 ;;
  *) printf '%s\\tinstalled\\n' "$p" ;; esac
done
"""


@pytest.fixture
def fake_dpkg(tmp_path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg-query").write_text(FAKE_DPKG_QUERY)
    (bin_dir / "dpkg-query").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def test_missing_build_dependency_is_one_line_naming_it(fake_dpkg, tmp_path, kvmpod_env):
    cache = tmp_path / "cache"
    env = {**kvmpod_env, "PATH": os.environ["PATH"], "MISSING": "flex bison", "KVMPOD_CACHE_DIR": str(cache)}
    proc = subprocess.run(kvmpod_cmd("setup", "--only", "minimal-kernel"), capture_output=True, text=True, env=env)
    assert proc.returncode == 125
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kvmpod: error:")]
    assert errors == ["kvmpod: error: kvmpod's minimal guest kernel needs the Debian packages flex, bison: "
                      "apt-get install flex bison"], proc.stderr
    assert not (cache / "kernels").exists() and not (cache / "build").exists()  # nothing half-done
    env["MISSING"] = "libslirp-dev"
    proc = subprocess.run(kvmpod_cmd("setup", "--qemu-only"), capture_output=True, text=True, env=env)
    assert proc.returncode == 125
    assert proc.stderr.strip().endswith("kvmpod's QEMU needs the Debian package libslirp-dev: "
                                        "apt-get install libslirp-dev")


def test_missing_packages_reads_dpkg(fake_dpkg, monkeypatch):
    monkeypatch.setenv("MISSING", "zsh")
    assert provision.missing_packages(("make", "zsh", "gcc")) == ["zsh"]
    monkeypatch.setenv("MISSING", "")
    assert provision.missing_packages(("make",)) == []


def test_real_dpkg_knows_installed_and_missing_packages():
    assert provision.missing_packages(("dpkg", "no-such-package-kvmpod")) == ["no-such-package-kvmpod"]


def test_which_caches_count(monkeypatch, tmp_path):
    monkeypatch.setattr(provision, "own_cache", lambda: tmp_path / "user-cache")
    monkeypatch.delenv("KVMPOD_CACHE_DIR", raising=False)
    system = tmp_path / "system"
    monkeypatch.setattr(provision, "SYSTEM_CACHE", system)
    assert provision.reusable_caches() == []        # no system cache
    system.mkdir()
    assert provision.reusable_caches() == [system]
    monkeypatch.setattr(provision, "own_cache", lambda: system)
    assert provision.reusable_caches() == []        # root: the system cache is its own
    monkeypatch.setattr(provision, "own_cache", lambda: tmp_path / "user-cache")
    monkeypatch.setenv("KVMPOD_CACHE_DIR", str(tmp_path / "user-cache"))
    assert provision.reusable_caches() == []        # one cache named for everything


def test_setup_options_exclude_each_other(kvmpod_env):
    proc = subprocess.run(kvmpod_cmd("setup", "--kernel-only", "--qemu-only"), capture_output=True, text=True,
                          env=kvmpod_env)
    assert proc.returncode == 125
    assert "not allowed with argument" in proc.stderr


def test_the_steps_cover_the_step_names():
    assert [s.name for s in provision.steps()] == list(provision.STEP_NAMES)
    assert set(provision.KERNEL_STEPS) < set(provision.STEP_NAMES)


def test_sample_config_shows_every_default():
    """packaging/kvmpod.toml, uncommented, is valid TOML whose values are kvmpod's defaults."""
    from kvmpod.boot.snapshot import DEFAULT_KEEP
    from kvmpod.image.limits import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_SIZE
    from kvmpod.image.signature import DEFAULT_KEYRING
    from kvmpod.net.bridge import DEFAULT_SUBNET
    from kvmpod.pod.resources import DEFAULT_POD_MEMORY_MIB
    from kvmpod.net.cni import DEFAULT_CONFIG_DIRS, DEFAULT_PLUGIN_PATH, DEFAULT_TIMEOUT
    from kvmpod.config import parse_size
    from kvmpod.vm.sandbox import QEMU_USER

    text = (REPO / "packaging" / "kvmpod.toml").read_text()
    assert tomllib.loads(text) == {"run": {}, "net": {}, "image": {}, "security": {}}   # as shipped: changes nothing
    settings = tomllib.loads("\n".join(line[1:] if line.startswith("#") and "=" in line else line
                                       for line in text.splitlines()))
    assert settings["run"] == {"boot": "snapshot", "snapshots-kept": DEFAULT_KEEP, "volume-transport": "auto",
                               "idle-relay": True,
                               "memory": f"{DEFAULT_POD_MEMORY_MIB}M", "cpus": 1}
    assert settings["net"]["default-subnet"] == DEFAULT_SUBNET
    assert settings["net"]["cni-config-dirs"] == list(DEFAULT_CONFIG_DIRS)
    assert settings["net"]["cni-plugin-path"] == list(DEFAULT_PLUGIN_PATH)
    assert settings["net"]["cni-plugin-timeout"] == DEFAULT_TIMEOUT
    assert settings["image"]["trusted-keys"] == str(DEFAULT_KEYRING)
    assert parse_size(settings["image"]["max-size"]) == DEFAULT_MAX_SIZE
    assert settings["image"]["max-entries"] == DEFAULT_MAX_ENTRIES
    assert settings["security"]["sandbox"] is True
    assert settings["security"]["qemu-user"] == QEMU_USER


def test_qemu_step_builds_once_and_keeps_makes_log(tmp_path, monkeypatch, capsys):
    """The QEMU step with the slow parts faked (fetching Debian's source, make, strip): the first run
    builds and keeps make's log with the build, the second finds the build and does nothing."""
    from kvmpod.vm import qemu_build, qemu_binary

    monkeypatch.setenv("KVMPOD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(qemu_build, "source_version", lambda package=qemu_build.BINARY_PACKAGE: "1:7.2+fake-1")
    monkeypatch.setattr(qemu_binary, "DEBIAN_QEMU", tmp_path / "debian-qemu")
    monkeypatch.setattr(qemu_build, "DEBIAN_QEMU", tmp_path / "debian-qemu")
    (tmp_path / "debian-qemu").write_text("")
    fetched: list[Path] = []

    def fake_fetch(work, version, log):
        fetched.append(work)
        (work / "src").mkdir(exist_ok=True)
        return work / "src"

    def fake_make(src, out, version, digest, jobs, log):
        out.mkdir(parents=True, exist_ok=True)
        (out / "build.log").write_text("make: the whole of QEMU\n")
        binary = out / qemu_build.QEMU_NAME
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        return binary

    real_run_tool = qemu_build.kcache.run_tool

    def fake_tools(cmd, cwd=None, error=None):
        if cmd[0] == "strip":
            Path(cmd[2]).write_bytes(Path(cmd[3]).read_bytes())
            Path(cmd[2]).chmod(0o755)
            return ""
        return real_run_tool(cmd, cwd=cwd, error=error)

    monkeypatch.setattr(qemu_build, "_fetch_source", fake_fetch)
    monkeypatch.setattr(qemu_build, "_build_binary", fake_make)
    monkeypatch.setattr(qemu_build, "missing_capabilities", lambda binary: [])
    monkeypatch.setattr(qemu_build.kcache, "run_tool", fake_tools)
    monkeypatch.setattr(provision, "check_packages", lambda step: None)

    (first,) = provision.run_steps(["qemu"])
    assert first.built and (first.path / qemu_build.QEMU_NAME).is_file()
    assert (first.path / qemu_build.BUILD_LOG).read_text() == "make: the whole of QEMU\n"
    assert not (tmp_path / "cache" / "build").exists() or list((tmp_path / "cache" / "build").iterdir()) == []
    (second,) = provision.run_steps(["qemu"])
    assert not second.built and second.path == first.path and len(fetched) == 1
    out = capsys.readouterr().out
    assert f"      built: {first.path} (" in out and f"      up to date: {first.path} (" in out
    assert "up to date" in second.log.read_text() and "built" in second.log.read_text()


def test_list_packages_names_what_the_chosen_steps_need(kvmpod_env):
    every = subprocess.run(kvmpod_cmd("setup", "--list-packages"), capture_output=True, text=True, check=True,
                           env=kvmpod_env).stdout.split()
    qemu = subprocess.run(kvmpod_cmd("setup", "--qemu-only", "--list-packages"), capture_output=True, text=True,
                          check=True, env=kvmpod_env).stdout.split()
    assert {"linux-source-6.1", "flex", "kmod", "qemu-system-x86", "libslirp-dev"} <= set(every)
    assert "libslirp-dev" in qemu and "linux-source-6.1" not in qemu
    assert len(every) == len(set(every))
