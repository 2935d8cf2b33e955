"""`kvmpod doctor` (kvmpod/doctor.py) over fixture hosts (tests/unit/hostfixtures.py): real KVM, nested
KVM, PVM-only, no /dev/kvm, no cgroup v2, not root; and on this machine, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kvmpod import doctor
from kvmpod.cli import main
from tests.unit.hostfixtures import make_host

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"   # one nobody may run (the venv's may live under /root)


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


@pytest.fixture
def host_env(tmp_path, monkeypatch) -> Path:
    """QEMU, a guest kernel (with virtio-vsock), the agent and kvmpod's directories of a fixture host,
    named through the environment as for every kvmpod command."""
    tools = tmp_path / "tools"
    tools.mkdir()
    qemu = tools / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\nexit 0\n")
    qemu.chmod(0o755)
    kernel = tools / "kernel"
    kernel.mkdir()
    (kernel / "vmlinux").write_bytes(b"\0" * 64)
    (kernel / "config").write_text("CONFIG_VIRTIO_VSOCKETS=y\n")
    (kernel / "kernel.json").write_text(json.dumps({"kind": "minimal", "version": "6.1.0-test", "image": "vmlinux",
                                                    "config": "config"}))
    (tools / "kvmpod-agent").write_bytes(b"\x7fELF")
    for name, value in {"KVMPOD_QEMU": qemu, "KVMPOD_KERNEL": kernel, "KVMPOD_AGENT": tools / "kvmpod-agent",
                        "KVMPOD_STORE_DIR": tmp_path / "store", "KVMPOD_RUN_DIR": tmp_path / "run",
                        "KVMPOD_CACHE_DIR": tmp_path / "cache", "XDG_CONFIG_HOME": tmp_path / "config"}.items():
        monkeypatch.setenv(name, str(value))
    doctor.find_qemu.cache_clear()
    yield tmp_path
    doctor.find_qemu.cache_clear()


@pytest.mark.parametrize("kind, accel, status, reason", [
    ("real", "kvm", "ok", "real KVM (kvm_intel)"),
    ("nested", "kvm", "ok", "nested KVM (kvm_intel): this host is itself a VM"),
    ("pvm", "tcg", "note", "TCG software emulation (slow): /dev/kvm is PVM-only"),
    ("no-dev-kvm", "tcg", "note", "TCG software emulation (slow): /dev/kvm does not exist"),
])
def test_the_accelerator_of_each_kind_of_host(host_env, kind, accel, status, reason):
    checks = doctor.examine(make_host(host_env / "host", kind))
    found = by_name(checks)
    assert (found["accelerator"].value, found["accelerator"].status) == (accel, status)
    assert found["accelerator"].reason.startswith(reason)
    assert found["kvm"].value == {"no-dev-kvm": "none"}.get(kind, kind)
    assert doctor.can_run(checks), [c.line() for c in checks if c.status == "fail"]


def test_nested_kvm_says_whether_the_pods_could_nest_further(host_env):
    found = by_name(doctor.examine(make_host(host_env / "host", "nested")))
    assert found["nested guests"].line() == ("ok    nested guests:    off: kvm_intel nested=off: KVM inside a pod's "
                                             "VM is not possible")
    assert "nested guests" not in by_name(doctor.examine(make_host(host_env / "pvm", "pvm")))


def test_vhost_devices_and_the_transport_they_give(host_env):
    without = by_name(doctor.examine(make_host(host_env / "a", "pvm")))
    assert (without["vhost-vsock"].value, without["vhost-net"].value) == ("no", "no")
    assert without["agent transport"].value == "vsock-user"
    assert "does not exist: the host kernel has no vhost_vsock" in without["vhost-vsock"].reason
    with_vhost = by_name(doctor.examine(make_host(host_env / "b", "real", vhost=True)))
    assert (with_vhost["vhost-vsock"].value, with_vhost["vhost-net"].value) == ("yes", "yes")
    assert with_vhost["agent transport"].value == "vhost-vsock"


def test_cgroup_layouts_v2_v1_and_none(host_env):
    v2 = by_name(doctor.examine(make_host(host_env / "v2", "real", cgroups="v2")))["cgroups"]
    assert (v2.value, v2.status) == ("v2", "ok") and "memory, pids, cpu in v2" in v2.reason
    v1 = by_name(doctor.examine(make_host(host_env / "v1", "real", cgroups="v1")))["cgroups"]
    assert (v1.value, v1.status) == ("v1", "ok")
    assert "memory in v1" in v1.reason and "cpu in v1" in v1.reason
    none = by_name(doctor.examine(make_host(host_env / "none", "real", cgroups="none")))["cgroups"]
    assert (none.value, none.status) == ("none", "note") and none.reason.startswith("no cgroup for the VMs")


def test_what_blocks_pods_fails_and_the_rest_still_shows(host_env, monkeypatch):
    monkeypatch.setenv("KVMPOD_KERNEL", str(host_env / "no-such-kernel"))
    monkeypatch.setenv("KVMPOD_QEMU", str(host_env / "no-such-qemu"))
    doctor.find_qemu.cache_clear()
    checks = doctor.examine(make_host(host_env / "host", "real"))
    failed = [c.name for c in checks if c.status == "fail"]
    assert failed == ["qemu", "guest kernel"] and not doctor.can_run(checks)
    assert "agent transport" not in by_name(checks)  # it depends on the kernel
    report = doctor.report(checks)
    assert report["can_run_pods"] is False and report["blocking"] == failed
    assert len(report["checks"]) == len(checks)


def test_the_cli_exits_1_with_each_blocking_line(host_env, monkeypatch, capsys):
    monkeypatch.setenv("KVMPOD_KERNEL", str(host_env / "no-such-kernel"))
    assert main(["doctor"]) == 1
    out, err = capsys.readouterr()
    assert any(line.startswith("fail  guest kernel:     none: guest kernel not found") for line in out.splitlines())
    assert out.splitlines()[-1] == "pods cannot run here: guest kernel"
    assert err.splitlines() == [f"kvmpod: error: pods cannot run here: guest kernel: guest kernel not found: "
                                f"{host_env / 'no-such-kernel'} ($KVMPOD_KERNEL)"]
    assert main(["doctor", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["blocking"] == ["guest kernel"]


@pytest.mark.skipif(os.geteuid() != 0, reason="becomes nobody to see what a user without privileges gets")
def test_not_root(host_env):
    """As nobody over a fixture host: user-mode networking, 9p volumes, no tun, a store it cannot write (which
    blocks pods: root may write anywhere, so this is where an unwritable store is tested)."""
    with tempfile.TemporaryDirectory(prefix="kvmpod-doctor-") as top:
        os.chmod(top, 0o755)
        root = make_host(Path(top) / "host", "real")
        for d in (host_env, host_env / "tools", host_env / "tools" / "kernel"):
            d.chmod(0o755)
        opened = {p: p.stat().st_mode for p in host_env.parents   # pytest's tmp dirs are root's alone
                  if str(p).startswith("/tmp/") and p != Path("/tmp") and not p.stat().st_mode & 0o005}
        home = Path(top) / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        env = {k: v for k, v in os.environ.items() if k.startswith("KVMPOD_")}
        env.update(KVMPOD_STORE_DIR="/var/lib/kvmpod-not-nobodys", KVMPOD_RUN_DIR=str(home / "run"),
                   KVMPOD_CACHE_DIR=str(home / "cache"), HOME=str(home), PYTHONPATH=str(REPO))
        code = ("import json, sys; from pathlib import Path; from kvmpod import doctor;"
                "print(json.dumps(doctor.report(doctor.examine(Path(sys.argv[1])))))")
        try:
            for parent, mode in opened.items():
                parent.chmod(mode | 0o005)
            out = subprocess.run([SYSTEM_PYTHON, "-c", code, str(root)], capture_output=True, text=True, user=65534,
                                 group=65534, extra_groups=[], env=env, cwd="/", check=True).stdout
        finally:
            for parent, mode in opened.items():
                parent.chmod(mode)
    found = {c["name"]: c for c in json.loads(out)["checks"]}
    assert found["user"]["value"] == "uid 65534" and found["user"]["status"] == "note"
    assert found["network"]["value"] == "user" and "not possible (it needs root" in found["network"]["reason"]
    assert found["host volumes"]["value"] == "9p" and "file owners are not kept" in found["host volumes"]["reason"]
    assert found["tun"]["value"] == "no" and "Permission denied" in found["tun"]["reason"]
    assert found["accelerator"]["value"] == "tcg" and "not readable and writable" in found["accelerator"]["reason"]
    assert found["store"]["status"] == "fail" and found["runtime"]["status"] == "ok"
    assert json.loads(out)["blocking"] == ["store"]


def test_this_machine_through_the_cli():
    """What doctor says here agrees with the files themselves (on the test machine: PVM-only, so TCG,
    and neither vhost-vsock nor vhost-net)."""
    result = subprocess.run([sys.executable, "-m", "kvmpod", "doctor", "--json"], capture_output=True, text=True)
    report = json.loads(result.stdout)
    assert result.returncode == (0 if report["can_run_pods"] else 1)
    found = {c["name"]: c for c in report["checks"]}
    modules = set(os.listdir("/sys/module"))
    cpu_virt = bool({"vmx", "svm"} & set(Path("/proc/cpuinfo").read_text().split()))
    if "kvm_pvm" in modules and not cpu_virt and not {"kvm_intel", "kvm_amd"} & modules:
        assert found["kvm"]["value"] == "pvm"
        assert found["accelerator"]["value"] == "tcg" and "PVM-only" in found["accelerator"]["reason"]
    assert found["vhost-vsock"]["value"] == ("yes" if os.path.exists("/dev/vhost-vsock") else "no")
    assert found["vhost-net"]["value"] == ("yes" if os.path.exists("/dev/vhost-net") else "no")
    text = subprocess.run([sys.executable, "-m", "kvmpod", "doctor"], capture_output=True, text=True)
    assert text.returncode == result.returncode
    last = text.stdout.splitlines()[-1]
    assert last == ("pods can run here: " + ", ".join(f"{n} {found[n]['value']}" for n in
                                                   ("accelerator", "agent transport", "network") if n in found)
                    if report["can_run_pods"] else f"pods cannot run here: {', '.join(report['blocking'])}")
    assert [line.split(":")[0].split()[-1] for line in text.stdout.splitlines()][:2] == ["kvm", "accelerator"]


def test_the_backend_and_what_libvirt_offers(host_env, monkeypatch, tmp_path):
    """The backend line is run's own choice ([vm] backend); without libvirt-python the libvirt backend is a
    note, unless kvmpod.toml chose it: then pods cannot run, and doctor says what to install."""
    monkeypatch.setattr(doctor, "libvirt_installed", lambda: False)
    found = by_name(doctor.examine(make_host(host_env / "host", "real")))
    assert found["backend"].value == "qemu" and found["backend"].status == "ok"
    assert found["libvirt"].status == "note" and "libvirt-python is not installed" in found["libvirt"].reason
    config = tmp_path / "libvirt.toml"
    config.write_text('[vm]\nbackend = "libvirt"\n')
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    monkeypatch.setattr("kvmpod.vm.backend_choice.libvirt_installed", lambda: False)
    checks = doctor.examine(make_host(host_env / "host2", "real"))
    backend = by_name(checks)["backend"]
    assert backend.status == "fail" and "needs libvirt-python" in backend.reason and not doctor.can_run(checks)
