"""vagrant/ (vagrant/README.md): the Vagrantfile validates with Debian's vagrant and its libvirt plugin
(`make vagrant-deps`, which `make test` pulls in), and the provisioning script, run twice on this
already set-up machine, succeeds both times without redoing anything.

What is not exercised here: booting the box (boxes cannot be downloaded on these machines), and the
VirtualBox provider's settings (Debian 12 has no VirtualBox, and vagrant checks a provider's settings
only with the provider installed; its lines are evaluated as Ruby all the same)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"

needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None,
                                   reason="vagrant is not installed (`make vagrant-deps`, part of `make test`)")


def clean_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a shell on the box: no KVMPOD_* of the test session, no outer make's jobserver."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KVMPOD_") and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["VAGRANT_HOME"] = str(tmp_path / "vagrant.d")   # vagrant's own state, not the machine's ~/.vagrant.d
    return env


@needs_vagrant
def test_the_vagrantfile_validates_with_the_libvirt_provider(tmp_path):
    plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True, cwd=VAGRANT_DIR,
                             env=clean_env(tmp_path), timeout=120)
    assert "vagrant-libvirt" in plugins.stdout, plugins.stdout + plugins.stderr
    result = subprocess.run(["vagrant", "validate"], capture_output=True, text=True, cwd=VAGRANT_DIR,
                            env=clean_env(tmp_path), timeout=120)
    assert result.returncode == 0 and "Vagrantfile validated successfully." in result.stdout, result.stderr


@needs_vagrant
def test_a_wrong_provider_setting_fails_validation(tmp_path):
    """The check above can fail: the same Vagrantfile with a setting libvirt does not have does not validate."""
    broken = tmp_path / "box"
    broken.mkdir()
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert "lv.nested = true" in text
    (broken / "Vagrantfile").write_text(text.replace("lv.nested = true", "lv.nested = true\n    lv.nested_typo = 1"))
    shutil.copy(VAGRANT_DIR / "provision.sh", broken / "provision.sh")
    result = subprocess.run(["vagrant", "validate"], capture_output=True, text=True, cwd=broken,
                            env=clean_env(tmp_path), timeout=120)
    assert result.returncode != 0 and "nested_typo" in result.stdout + result.stderr


def test_the_vagrantfile_turns_nested_virtualization_on_for_both_providers():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert 'lv.cpu_mode = "host-passthrough"' in text and "lv.nested = true" in text
    assert '"--nested-hw-virt", "on"' in text
    assert 'config.vm.synced_folder "..", "/vagrant"' in text
    assert 'path: "provision.sh"' in text


@pytest.mark.skipif(os.geteuid() != 0, reason="provisioning runs as root, as vagrant runs it")
def test_provisioning_twice_on_a_set_up_machine_succeeds_and_redoes_nothing(tmp_path):
    runs = [subprocess.run([str(VAGRANT_DIR / "provision.sh"), str(REPO)], capture_output=True, text=True,
                           env=clean_env(tmp_path), timeout=1800) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        # `kvmpod doctor` ran, and found that pods can run
        assert any(line.split(":")[0].split()[-1:] == ["accelerator"] for line in run.stdout.splitlines())
    second = runs[1].stdout + runs[1].stderr
    assert "kvmpod setup: everything was up to date" in second
    assert "installing Debian packages" not in second
