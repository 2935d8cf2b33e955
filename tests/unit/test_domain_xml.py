"""The libvirt domain XML is the same VMConfig the QEMU argv comes from (kvmpod/vm/domain_xml.py):
parsed back, every value matches the config; rendering leaves the QEMU argv as it was."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from xml.etree import ElementTree

import pytest

from kvmpod.errors import ConfigError, KvmpodError
from kvmpod.vm import backend_choice
from kvmpod.vm.config import AGENT_PORT_NAME, TCG_CACHE_MIB, Disk, FsDevice, NinePShare, Nic, VMConfig, qemu_argv
from kvmpod.vm.domain_xml import METADATA_NS, DomainSpec, domain_name, render, unsupported
from kvmpod.vm.libvirt_vm import pod_of, qemu_user, unreachable

UUID = "0b3c6e2a-5f1d-4c1e-9a77-2f0e8c1d4b5a"
QEMU = "http://libvirt.org/schemas/domain/qemu/1.0"


def config(**changes) -> VMConfig:
    base = dict(name=f"kvmpod-{UUID}", kernel=Path("/k/vm linux"), initrd=Path("/k/initrd&1.cpio"),
                cmdline="console=ttyS0 panic=-1 quiet kvmpod.hostname=<x> kvmpod.transport=serial",
                console_log=Path("/run/pods/p/console.log"), machine="pc", firmware=Path("/usr/share/qemu/qboot.rom"),
                memory_mib=384, cpus=2,
                disks=[Disk(Path("/store/rootfs/a,b.iso"), "img0"), Disk(Path("/store/rootfs/c.iso"), "img1")])
    base.update(changes)
    return VMConfig(**base)


SPEC = DomainSpec(domain_name(UUID), UUID, Path("/run/pods/p"), Path("/run/pods/p/agent.sock"),
                  Path("/usr/bin/qemu-system-x86_64"))


def parse(cfg: VMConfig, spec: DomainSpec = SPEC) -> ElementTree.Element:
    return ElementTree.fromstring(render(cfg, spec))


def test_the_domain_is_the_vm_config():
    cfg = config()
    dom = parse(cfg)
    assert dom.get("type") == "qemu"   # TCG: kvmpod's accelerator choice, not libvirt's
    assert dom.findtext("name") == "kvmpod-0b3c6e2a" and dom.findtext("uuid") == UUID
    assert (dom.find("memory").get("unit"), dom.findtext("memory")) == ("MiB", "384")
    assert dom.findtext("vcpu") == "2"
    os_ = dom.find("os")
    assert os_.find("type").get("machine") == "pc"
    assert os_.findtext("loader") == "/usr/share/qemu/qboot.rom"
    assert (os_.findtext("kernel"), os_.findtext("initrd"), os_.findtext("cmdline")) == (
        str(cfg.kernel), str(cfg.initrd), cfg.cmdline)   # escaped in the XML, exact once parsed
    assert dom.find("features/tcg/tb-cache").text == str(TCG_CACHE_MIB)
    assert [dom.findtext(f"on_{e}") for e in ("poweroff", "reboot", "crash")] == ["destroy"] * 3
    disks = dom.findall("devices/disk")
    assert [(d.find("source").get("file"), d.findtext("serial")) for d in disks] == [
        (str(d.path), d.serial) for d in cfg.disks]
    assert all(d.find("readonly") is not None and d.find("target").get("bus") == "virtio" for d in disks)
    # the store's images are shared by other pods: libvirt must not chown them
    assert all(d.find("source/seclabel").get("relabel") == "no" for d in disks)
    assert dom.find("devices/serial/source").get("path") == str(cfg.console_log)
    channel = dom.find("devices/channel")
    assert (channel.get("type"), channel.find("source").get("mode"), channel.find("source").get("path")) == (
        "unix", "bind", str(SPEC.agent_socket))
    assert channel.find("target").get("name") == AGENT_PORT_NAME
    assert dom.find("devices/panic").get("model") == "isa"
    assert dom.find("devices/emulator").text == str(SPEC.emulator)
    assert dom.find("memoryBacking") is None and dom.find(f"{{{QEMU}}}commandline") is None
    assert pod_of(render(cfg, SPEC)) == (UUID, str(SPEC.pod_dir))


def test_kvm_and_virtio_fs_with_shared_memory():
    cfg = config(accel="kvm", filesystems=[FsDevice("vol0", Path("/run/pods/p/vol0.sock"))])
    dom = parse(cfg)
    assert dom.get("type") == "kvm" and dom.find("features/tcg") is None
    assert dom.find("memoryBacking/source").get("type") == "memfd"
    assert dom.find("memoryBacking/access").get("mode") == "shared"
    fs = dom.find("devices/filesystem")
    assert fs.find("driver").get("type") == "virtiofs"
    assert (fs.find("source").get("socket"), fs.find("target").get("dir")) == ("/run/pods/p/vol0.sock", "vol0")


def test_microvm_puts_every_virtio_device_on_mmio_and_keeps_its_machine_options():
    options = ("x-option-roms=off", "pit=off", "pic=off", "rtc=on", "acpi=on")
    cfg = config(machine="microvm", machine_options=options, firmware=None,
                 filesystems=[FsDevice("vol0", Path("/s.sock"))], nics=[Nic("52:54:00:12:34:56", user_options=("hostfwd=tcp:127.0.0.1:8080-:80",))])
    dom = parse(cfg)
    assert dom.find("os/type").get("machine") == "microvm" and dom.find("os/loader") is None
    for path in ("devices/disk", "devices/filesystem", "devices/controller[@type='virtio-serial']"):
        assert all(e.find("address").get("type") == "virtio-mmio" for e in dom.findall(path)), path
    args = [a.get("value") for a in dom.findall(f"{{{QEMU}}}commandline/{{{QEMU}}}arg")]
    assert args[:2] == ["-machine", ",".join(options)]
    assert "virtio-mmio.force-legacy=false" in args
    assert args[-4:] == ["-netdev", "user,id=kvmpodnet0,hostfwd=tcp:127.0.0.1:8080-:80",
                         "-device", "virtio-net-device,netdev=kvmpodnet0,mac=52:54:00:12:34:56"]


@pytest.mark.parametrize("machine", ["pc", "microvm"])
def test_the_kernels_vhost_vsock_is_a_vsock_element_with_the_pods_cid(machine):
    """Where /dev/vhost-vsock is usable (not on this host: the e2e case is tests/e2e/libvirt), the agent's
    channel is a <vsock> with kvmpod's CID instead of the virtio-serial port."""
    dom = parse(config(agent_transport="vhost-vsock", vsock_cid=42, machine=machine, firmware=None))
    vsock = dom.find("devices/vsock")
    assert vsock.get("model") == "virtio" and vsock.find("cid").attrib == {"auto": "no", "address": "42"}
    assert dom.find("devices/channel") is None and dom.find("devices/controller[@type='virtio-serial']") is None
    assert (vsock.find("address") is not None) == (machine == "microvm")


def test_user_networking_on_pci():
    dom = parse(config(nics=[Nic("52:54:00:00:00:01")]))
    args = [a.get("value") for a in dom.findall(f"{{{QEMU}}}commandline/{{{QEMU}}}arg")]
    assert args == ["-netdev", "user,id=kvmpodnet0", "-device",
                    "virtio-net-pci,netdev=kvmpodnet0,mac=52:54:00:00:00:01,romfile=,bus=pci.0,addr=0x1f"]


def test_a_persistent_tap_is_an_ethernet_interface_libvirt_opens_by_name():
    dom = parse(config(nics=[Nic("02:12:34:56:78:00", tap_name="kvtap12345678")]))
    [nic] = dom.findall("devices/interface")
    assert nic.get("type") == "ethernet"
    assert (nic.find("target").get("dev"), nic.find("target").get("managed")) == ("kvtap12345678", "no")
    assert nic.find("mac").get("address") == "02:12:34:56:78:00"   # kvmpod's MAC, as its lease has it
    assert nic.find("model").get("type") == "virtio" and nic.find("driver").get("name") == "qemu"
    assert nic.find("rom").get("enabled") == "no" and nic.find("address") is None   # libvirt picks the PCI slot
    assert dom.find(f"{{{QEMU}}}commandline") is None   # no slirp NIC in QEMU's own options
    vhost = parse(config(nics=[Nic("02:12:34:56:78:00", vhost=True, tap_name="kvtap12345678")]))
    assert vhost.find("devices/interface/driver").get("name") == "vhost"


def test_a_tap_on_microvm_is_on_virtio_mmio_without_a_rom():
    cfg = config(machine="microvm", machine_options=("acpi=on",), firmware=None,
                 nics=[Nic("02:12:34:56:78:00", tap_name="kvtap12345678")])
    nic = parse(cfg).find("devices/interface")
    assert nic.find("address").get("type") == "virtio-mmio" and nic.find("rom") is None


def test_a_one_vcpu_tcg_domain_may_hold_two_like_qemus_own_argv():
    dom = parse(config(cpus=1))
    assert (dom.findtext("vcpu"), dom.find("vcpu").get("current")) == ("2", "1")
    assert parse(config(cpus=1, accel="kvm")).find("vcpu").get("current") is None


def test_rendering_leaves_the_config_and_its_qemu_argv_as_they_were():
    cfg = config(agent_fd=7, qmp_fd=8)
    before, argv = copy.deepcopy(cfg), qemu_argv(cfg)
    render(cfg, SPEC)
    assert cfg == before and qemu_argv(cfg) == argv


@pytest.mark.parametrize("changes, flag", [
    (dict(agent_transport="vsock-user"), "--agent-transport vsock-user"),
    (dict(memory_file=Path("/snap/mem")), "--boot snapshot"),
    (dict(shares_9p=[NinePShare("v", Path("/d"))]), "virtio-9p"),
    (dict(nics=[Nic("52:54:00:00:00:02", tap_fd=5)]), "--net cni/netns"),
    (dict(agent_transport="vhost-vsock"), "vhost-vsock: the domain's guest CID"),
])
def test_what_a_domain_cannot_carry_is_refused_by_name(changes, flag):
    cfg = config(**changes)
    assert flag in (unsupported(cfg) or "")
    with pytest.raises(ValueError, match=flag.split()[0]):
        render(cfg, SPEC)


def test_metadata_of_another_kind_is_no_pod():
    assert pod_of("<domain><name>kvmpod-x</name></domain>") is None
    assert pod_of("<domain><metadata><pod xmlns='urn:other'><uuid>u</uuid><dir>d</dir></pod></metadata></domain>") is None
    assert pod_of(f"<domain><metadata><p:pod xmlns:p='{METADATA_NS}'><p:uuid>u</p:uuid></p:pod></metadata></domain>") is None
    assert pod_of("not xml") is None


def test_qemu_user_from_the_dac_base_label():
    caps = ("<capabilities><host><secmodel><model>none</model></secmodel><secmodel><model>dac</model><doi>0</doi>"
            "<baselabel type='kvm'>+64055:+107</baselabel><baselabel type='qemu'>+64055:+108</baselabel>"
            "</secmodel></host></capabilities>")
    assert qemu_user(caps, "tcg") == (64055, 108) and qemu_user(caps, "kvm") == (64055, 107)
    assert qemu_user("<capabilities/>", "tcg") is None


def test_unreachable_names_the_directory_that_stops_qemus_user():
    base = Path(tempfile.mkdtemp(dir="/tmp"))   # under /tmp (1777): pytest's temp dirs are root's alone
    try:
        os.chmod(base, 0o711)
        closed = base / "closed"
        (closed / "in").mkdir(parents=True)
        image = closed / "in" / "img.iso"
        image.write_bytes(b"x")
        os.chmod(image, 0o644)
        assert unreachable(image, 65534, 65534) is None
        os.chmod(closed, 0o700)
        assert unreachable(image, 65534, 65534) == closed
        os.chmod(closed, 0o755)
        os.chmod(image, 0o600)
        assert unreachable(image, 65534, 65534) == image
    finally:
        shutil.rmtree(base)


def test_backend_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("KVMPOD_CONFIG", raising=False)
    assert backend_choice.choose_backend(None, None).name == "qemu"
    with pytest.raises(ConfigError, match="--libvirt-uri: the QEMU backend takes none"):
        backend_choice.choose_backend(None, "qemu:///system")
    with pytest.raises(ConfigError, match="unknown VM backend 'xen'"):
        backend_choice.choose_backend("xen", None)
    monkeypatch.setattr(backend_choice.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KvmpodError, match=r"pip install 'kvmpod\[libvirt\]'"):
        backend_choice.choose_backend("libvirt", None)


def test_the_pods_limits_go_to_libvirts_cgroup_of_the_domain():
    from dataclasses import replace

    from kvmpod.vm.cgroup import CPU_PERIOD_US, limits_for

    limits = limits_for(384, 2, tcg=True)
    dom = parse(config(), replace(SPEC, limits=limits))
    assert dom.findtext("memtune/hard_limit") == dom.findtext("memtune/swap_hard_limit") == str(limits.memory_bytes)
    assert dom.find("memtune/hard_limit").get("unit") == "b"
    assert (dom.findtext("cputune/global_period"), dom.findtext("cputune/global_quota")) == (
        str(CPU_PERIOD_US), str(limits.cpu_quota_us))
    without_memory = parse(config(), replace(SPEC, limits=limits, memory_limit=False))
    assert without_memory.find("memtune") is None and without_memory.find("cputune") is not None
    assert parse(config()).find("cputune") is None


def test_how_a_domain_ended_is_told_as_a_qemu_exit():
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (the [libvirt] extra)")

    from kvmpod.vm.libvirt_vm import LibvirtVM

    def ended(detail: int, **flags: bool) -> str:
        vm = LibvirtVM(config(), SPEC, "qemu:///system")
        for name, value in flags.items():
            setattr(vm, f"_{name}", value)
        return vm._exit_for(detail).describe()

    assert ended(libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN) == "the guest powered off"
    assert ended(libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED) == "the guest kernel panicked"
    assert ended(libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, panicked=True) == "the guest kernel panicked"
    assert ended(libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, reset=True) == "the guest reset itself"
    assert "libvirt destroyed domain kvmpod-0b3c6e2a" in ended(libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)
    assert ended(libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, destroying=True) == "QEMU was killed by signal 9"
    assert "/var/log/libvirt/qemu/kvmpod-0b3c6e2a.log" in ended(libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED)
