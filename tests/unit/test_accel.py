"""The accelerator choice (kvmpod/vm/accel.py) over fixture hosts: the files it reads (/proc/cpuinfo,
/sys/module/kvm*/parameters, /dev/kvm) as a real KVM host, a nested-KVM guest, a PVM-only host, a host
without /dev/kvm and one whose /dev/kvm this user may not open."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from kvmpod.errors import VMError
from kvmpod.vm.accel import HostFacts, choose_accelerator, kvm_kind, nested_for_guests
from tests.unit.hostfixtures import make_host


def probe(tmp_path: Path, kind: str) -> HostFacts:
    return HostFacts.probe(make_host(tmp_path, kind))


def test_real_kvm_is_used_and_said_so(tmp_path):
    facts = probe(tmp_path, "real")
    assert (kvm_kind(facts), facts.hw_module, facts.in_guest, facts.nested) == ("real", "kvm_intel", False, True)
    accel = choose_accelerator("auto", facts)
    assert accel.name == "kvm" and accel.reason == "real KVM (kvm_intel)"
    assert nested_for_guests(facts) == "kvm_intel nested=on: KVM inside a pod's VM is possible"


def test_nested_kvm_in_a_guest_is_used(tmp_path):
    facts = probe(tmp_path, "nested")
    assert kvm_kind(facts) == "nested" and facts.in_guest and facts.nested is False
    accel = choose_accelerator("auto", facts)
    assert accel.name == "kvm" and accel.reason.startswith("nested KVM (kvm_intel): this host is itself a VM")
    assert choose_accelerator("kvm", facts).name == "kvm"
    assert nested_for_guests(facts) == "kvm_intel nested=off: KVM inside a pod's VM is not possible"


def test_nested_kvm_on_amd_reads_its_numeric_parameter(tmp_path):
    facts = probe(tmp_path, "nested-amd")
    assert (kvm_kind(facts), facts.hw_module, facts.nested) == ("nested", "kvm_amd", True)
    assert choose_accelerator("auto", facts).name == "kvm"


def test_pvm_only_falls_back_to_tcg(tmp_path):
    facts = probe(tmp_path, "pvm")
    assert kvm_kind(facts) == "pvm" and nested_for_guests(facts) is None
    accel = choose_accelerator("auto", facts)
    assert accel.name == "tcg" and accel.automatic and "PVM-only" in accel.reason
    with pytest.raises(VMError, match="--accel kvm: KVM cannot be used here: /dev/kvm is PVM-only"):
        choose_accelerator("kvm", facts)


def test_no_dev_kvm_falls_back_to_tcg(tmp_path):
    facts = probe(tmp_path, "no-dev-kvm")
    assert kvm_kind(facts) == "none"
    assert choose_accelerator("auto", facts).reason == "/dev/kvm does not exist"


# Debian's python3: the venv's interpreter (under /root here) may not be one nobody can run
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="becomes another user (nobody) to find /dev/kvm closed to it")
def test_dev_kvm_this_user_may_not_open_falls_back_to_tcg():
    # the tree must be readable by nobody, and /dev/kvm (a 0600 root file there) not writable by it
    with tempfile.TemporaryDirectory(prefix="kvmpod-accel-") as top:
        os.chmod(top, 0o755)
        root = make_host(Path(top), "real")
        (root / "dev/kvm").chmod(0o600)
        code = ("import sys; from pathlib import Path; from kvmpod.vm.accel import HostFacts, choose_accelerator;"
                "a = choose_accelerator('auto', HostFacts.probe(Path(sys.argv[1]))); print(a.name, a.reason)")
        out = subprocess.run([SYSTEM_PYTHON, "-c", code, str(root)], capture_output=True, text=True, user=65534,
                             group=65534, extra_groups=[], cwd="/", check=True,
                             env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])}).stdout
    assert out.strip() == "tcg /dev/kvm is not readable and writable by this user"


def test_this_machine_agrees_with_its_files():
    facts = HostFacts.probe()
    assert facts.dev_kvm_exists == Path("/dev/kvm").exists()
    assert facts.in_guest == ("hypervisor" in Path("/proc/cpuinfo").read_text().split())


@pytest.mark.parametrize("kind, accel_arg", [("real", "kvm"), ("nested", "kvm"), ("pvm", "tcg,tb-size="),
                                             ("no-dev-kvm", "tcg,tb-size=")])
def test_the_choice_reaches_qemus_command_line(tmp_path, kind, accel_arg):
    """What a real or nested KVM host gets is KVM in QEMU's argv, not only in the choice."""
    from kvmpod.vm.config import VMConfig, qemu_argv

    accel = choose_accelerator("auto", probe(tmp_path / "host", kind))
    cfg = VMConfig(name="kvmpod-x", kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0",
                   console_log=tmp_path / "c", qmp_fd=3, agent_fd=4, accel=accel.name)
    argv = qemu_argv(cfg)
    assert argv[argv.index("-accel") + 1].startswith(accel_arg)
