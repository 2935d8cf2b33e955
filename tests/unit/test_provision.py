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
    from kvmpod.net.cni import DEFAULT_CONFIG_DIRS, DEFAULT_PLUGIN_PATH, DEFAULT_TIMEOUT
    from kvmpod.config import parse_size

    text = (REPO / "packaging" / "kvmpod.toml").read_text()
    assert tomllib.loads(text) == {"run": {}, "net": {}, "image": {}}   # as shipped: changes nothing
    settings = tomllib.loads("\n".join(line[1:] if line.startswith("#") and "=" in line else line
                                       for line in text.splitlines()))
    assert settings["run"] == {"boot": "snapshot", "snapshots-kept": DEFAULT_KEEP, "idle-relay": True}
    assert settings["net"]["default-subnet"] == DEFAULT_SUBNET
    assert settings["net"]["cni-config-dirs"] == list(DEFAULT_CONFIG_DIRS)
    assert settings["net"]["cni-plugin-path"] == list(DEFAULT_PLUGIN_PATH)
    assert settings["net"]["cni-plugin-timeout"] == DEFAULT_TIMEOUT
    assert settings["image"]["trusted-keys"] == str(DEFAULT_KEYRING)
    assert parse_size(settings["image"]["max-size"]) == DEFAULT_MAX_SIZE
    assert settings["image"]["max-entries"] == DEFAULT_MAX_ENTRIES
