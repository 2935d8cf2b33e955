"""Pure rules of the run path: accelerator choice, app environment, CLI parsing, QEMU argv."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpod import cli
from kvmpod.cli import run as cli_run
from kvmpod.cli.parser import parse
from kvmpod.errors import VMError
from kvmpod.pod.spec import DEFAULT_PATH, app_environment, default_app_name
from kvmpod.vm.accel import HostFacts, choose_accelerator
from kvmpod.vm.config import Disk, VMConfig, qemu_argv

PVM = HostFacts(dev_kvm_exists=True, dev_kvm_usable=True, cpu_virt_flags=False, hw_kvm_module=False, pvm_module=True)
VMX = HostFacts(dev_kvm_exists=True, dev_kvm_usable=True, cpu_virt_flags=True, hw_kvm_module=True, pvm_module=False)
NO_KVM = HostFacts(False, False, True, False, False)


def test_pvm_only_host_falls_back_to_tcg_and_says_why():
    accel = choose_accelerator("auto", PVM)
    assert accel.name == "tcg" and accel.automatic and "PVM-only" in accel.reason


def test_real_kvm_is_used():
    assert choose_accelerator("auto", VMX).name == "kvm"


def test_missing_dev_kvm_falls_back():
    assert "does not exist" in choose_accelerator("auto", NO_KVM).reason


def test_forced_kvm_on_pvm_host_is_an_error():
    with pytest.raises(VMError, match="PVM-only"):
        choose_accelerator("kvm", PVM)


def test_forced_tcg_is_not_automatic():
    assert not choose_accelerator("tcg", VMX).automatic


def test_this_machine_is_probed_consistently():
    facts = HostFacts.probe()
    assert facts.dev_kvm_exists == Path("/dev/kvm").exists()


URL = "http://127.0.0.1:18112/token"


def test_environment_follows_the_executor_spec():
    env = app_environment("web", [("FOO", "image"), ("BAR", "image")], {"BAR": "pod"}, {"BAZ": "app"}, URL)
    assert env == [f"PATH={DEFAULT_PATH}", "AC_APP_NAME=web", f"AC_METADATA_URL={URL}", "container=kvmpod",
                   "FOO=image", "BAR=pod", "BAZ=app"]


def test_app_path_replaces_the_default_and_ac_app_name_cannot_be_overridden():
    env = app_environment("web", [("PATH", "/opt/bin"), ("AC_METADATA_URL", "http://image")], {},
                          {"AC_APP_NAME": "evil", "AC_METADATA_URL": "http://evil"}, URL)
    assert "PATH=/opt/bin" in env and f"PATH={DEFAULT_PATH}" not in env
    assert "AC_APP_NAME=web" in env and "AC_APP_NAME=evil" not in env
    assert [e for e in env if e.startswith("AC_METADATA_URL=")] == [f"AC_METADATA_URL={URL}"]


class _M:
    def __init__(self, name): self.name = name


@pytest.mark.parametrize("image, app", [("example.com/busybox", "busybox"), ("a/B_C.d", "b-c-d"), ("x/__", "app")])
def test_default_app_name(image, app):
    assert default_app_name(_M(image)) == app


def test_rkt_syntax_splits_pod_flags_app_flags_and_args():
    ns = parse(cli.build_parser(), 
        ["run", "--memory", "1G", "--set-env", "A=1", "img.aci", "--exec", "/bin/sh", "--set-env", "B=2",
         "--user", "app", "--", "-c", "echo --exec"])
    assert ns.memory == 1024 and dict(ns.set_env) == {"A": "1"}
    (app,) = cli_run._parse_apps(ns.app_words, ns.image)
    assert (app.image, app.exec, app.env, app.user, app.args) == ("img.aci", "/bin/sh", {"B": "2"}, "app",
                                                                    ["-c", "echo --exec"])


def test_triple_dash_separates_apps():
    ns = parse(cli.build_parser(), ["run", "a.aci", "--name", "one", "---", "b.aci", "--", "x"])
    apps = cli_run._parse_apps(ns.app_words, ns.image)
    assert [(a.image, a.name, a.args) for a in apps] == [("a.aci", "one", None), ("b.aci", None, ["x"])]


@pytest.mark.parametrize("argv, expected", [
    (["run", "img", "--", "-c", "echo hi"], [("img", ["-c", "echo hi"])]),          # -- right after IMAGE
    (["run", "--set-env", "A=--", "img", "--", "--"], [("img", ["--"])]),
    (["run", "a", "---", "b", "--", "x", "--", "y"], [("a", None), ("b", ["x", "--", "y"])]),
    (["run", "a", "---", "b"], [("a", None), ("b", None)]),
])
def test_double_dash_right_after_the_image_is_the_apps(argv, expected):
    ns = parse(cli.build_parser(), argv)
    apps = cli_run._parse_apps(ns.app_words, ns.image)
    assert [(a.image, a.args) for a in apps] == expected


@pytest.mark.parametrize("argv, problem", [
    (["run", "--memory", "12X", "a.aci"], "memory size"),
    (["run", "--cpus", "0", "a.aci"], "at least 1"),
    (["run", "a.aci", "--bogus"], "run: --bogus (after a.aci) is not an app flag"),
    (["run", "--bogus", "x", "a.aci", "--exec", "/bin/true"], "run: unknown flag --bogus (pod flags go before"),
    (["run", "a.aci", "---", "--exec", "/x"], "an image must follow ---"),
])
def test_usage_errors_are_one_line(argv, problem, capsys):
    assert cli.main(argv) == 125
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1


def test_qemu_argv_is_built_from_the_config(tmp_path):
    cfg = VMConfig(name="kvmpod-x", kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0 quiet",
                   console_log=tmp_path / "c", qmp_fd=3, agent_fd=4,
                   disks=[Disk(Path("/d.iso"), "img0")])
    argv = qemu_argv(cfg)
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet"
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert "virtio-blk-pci,drive=disk0,serial=img0" in argv
    assert any("readonly=on" in a for a in argv)
    assert not any(" " in a for a in argv if a != "console=ttyS0 quiet")


@pytest.mark.parametrize("accel, cpus, smp", [("tcg", 1, "1,maxcpus=2"), ("tcg", 2, "2"), ("tcg", 4, "4"),
                                               ("kvm", 1, "1"), ("kvm", 3, "3")])
def test_tcg_machines_can_hold_two_vcpus_so_guest_barriers_are_translated(tmp_path, accel, cpus, smp):
    # QEMU 7.2 drops a one-vCPU TCG guest's memory barriers, and a virtio driver then misses the
    # interrupt of a device in another thread (the 64-connection hang of docs/reliability.md).
    cfg = VMConfig(name="kvmpod-x", kernel=Path("/k"), initrd=Path("/i"), cmdline="quiet",
                   console_log=tmp_path / "c", accel=accel, cpus=cpus)
    argv = qemu_argv(cfg)
    assert argv[argv.index("-smp") + 1] == smp


def _kernel(tmp_path, kind: str, elf: bool, **config):
    from kvmpod.boot.kernel import GuestKernel
    image = tmp_path / ("vmlinux" if elf else "bzImage")
    image.write_bytes((b"\x7fELF" if elf else b"MZ\x00\x00") + bytes(60))
    return GuestKernel(image=image, version="6.1", kind=kind, config={f"CONFIG_{k}": v for k, v in config.items()})


def test_minimal_pvh_kernel_gets_microvm_with_tsc_and_lapic_options(tmp_path, monkeypatch):
    from kvmpod.vm import machine
    monkeypatch.setattr(machine, "host_tsc_khz", lambda: 2_500_000)
    plan = machine.plan_boot(_kernel(tmp_path, "minimal", True, PVH="y", VIRTIO_MMIO="y", ACPI="y"), 1, False)
    assert plan.machine == "microvm" and "rtc=on" in plan.machine_options and "acpi=on" in plan.machine_options
    assert "tsc_early_khz=2500000" in plan.cmdline.split() and "lapic_timer_khz=1000000" in plan.cmdline.split()


def test_distro_kernel_gets_pc(tmp_path, monkeypatch):
    from kvmpod.vm import machine
    monkeypatch.setattr(machine, "host_tsc_khz", lambda: 2_500_000)
    plan = machine.plan_boot(_kernel(tmp_path, "distro", False, PVH="y", VIRTIO_MMIO="m", ACPI="y"), 1, False)
    assert plan.machine == "pc" and "tsc_early_khz" not in plan.cmdline and "lapic_timer_khz" not in plan.cmdline


def test_microvm_under_tcg_needs_the_tsc_rate(tmp_path, monkeypatch):
    from kvmpod.vm import machine
    monkeypatch.setattr(machine, "host_tsc_khz", lambda: None)  # unknown: microvm would hang ~30 % of boots
    plan = machine.plan_boot(_kernel(tmp_path, "minimal", True, PVH="y", VIRTIO_MMIO="y", ACPI="y"), 1, False)
    assert plan.machine == "pc"


@pytest.mark.parametrize("argv, flag", [(["run", "--exec", "/x"], "--exec"),
                                        (["run", "--pod-manifest", "p.json", "--set-env", "A=1", "--user", "0"], "--user")])
def test_an_app_flag_before_any_image_is_named(argv, flag, capsys):
    assert cli.main(argv) == 125
    assert capsys.readouterr().err == (f"kvmpod: error: run: {flag} is an app flag: it goes after the IMAGE it applies "
                                       "to (a --pod-manifest gives each app's settings in the manifest)\n")
