"""Agent transport choice, CID allocation and the QEMU options for each transport (no VM)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpod.errors import VMError
from kvmpod.vm import cid as cidmod
from kvmpod.vm import transport as tr
from kvmpod.vm.config import VMConfig, qemu_argv


class FakeKernel:
    def __init__(self, vsock: str | None):
        self.vsock = vsock
        self.image = Path("/boot/vmlinux")

    def option(self, name: str) -> str | None:
        return self.vsock if name == "VIRTIO_VSOCKETS" else None


@pytest.fixture
def no_vhost(monkeypatch, tmp_path):
    monkeypatch.setattr(tr, "VHOST_VSOCK_DEV", tmp_path / "vhost-vsock")
    monkeypatch.setattr(tr.vhost_vsock_unusable, "__defaults__", (tmp_path / "vhost-vsock",))


def test_auto_without_vhost_vsock_uses_the_userspace_backend(no_vhost):
    t = tr.choose_transport("auto", FakeKernel("y"))
    assert t.kind == tr.VSOCK_USER and not t.notice
    assert "does not exist: the host kernel has no vhost_vsock" in t.reason
    assert t.kernel_arg() == "kvmpod.transport=vsock:1024"


def test_auto_with_a_usable_vhost_vsock_uses_it(monkeypatch):
    monkeypatch.setattr(tr, "vhost_vsock_unusable", lambda device=None: None)
    assert tr.choose_transport("auto", FakeKernel("m")).kind == tr.VHOST_VSOCK
    assert tr.choose_transport("vsock-user", FakeKernel("m")).kind == tr.VSOCK_USER


def test_auto_falls_back_to_serial_with_a_notice_when_the_guest_has_no_vsock(no_vhost):
    t = tr.choose_transport("auto", FakeKernel(None))
    assert t.kind == tr.SERIAL and "no virtio-vsock" in t.notice
    assert t.kernel_arg() == "kvmpod.transport=serial"
    with pytest.raises(VMError, match="--agent-transport vsock: .*no virtio-vsock"):
        tr.choose_transport("vsock", FakeKernel(None))


def test_forced_vhost_vsock_says_why_not(no_vhost):
    with pytest.raises(VMError, match="/dev/vhost-vsock|does not exist: the host kernel has no vhost_vsock"):
        tr.choose_transport("vhost-vsock", FakeKernel("y"))
    assert tr.choose_transport("serial", FakeKernel("y")).kind == tr.SERIAL
    with pytest.raises(VMError, match="unknown agent transport"):
        tr.choose_transport("carrier-pigeon", FakeKernel("y"))


def _cfg(**kw) -> VMConfig:
    base = dict(name="t", kernel=Path("/k"), initrd=Path("/i"), cmdline="c", console_log=Path("/c"),
                qmp_fd=3)
    return VMConfig(**{**base, **kw})


def test_qemu_argv_per_transport():
    user = qemu_argv(_cfg(agent_transport="vsock-user", vsock_cid=5, vhost_user_vsock=Path("/p/vhost-vsock.sock"),
                          machine="microvm"))
    assert "vhost-user-vsock-device,chardev=vsock" in user
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in user
    assert "virtio-mmio.force-legacy=false" in user
    assert not any("virtserialport" in a for a in user)
    kernel = qemu_argv(_cfg(agent_transport="vhost-vsock", vsock_cid=9))
    assert "vhost-vsock-pci,guest-cid=9" in kernel
    assert not any("memory-backend" in a for a in kernel)
    serial = qemu_argv(_cfg(agent_fd=4))
    assert any("virtserialport" in a for a in serial) and "socket,id=agent,fd=4" in serial
    assert not any("vsock" in a for a in serial)


def test_cids_are_unique_and_released(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMPOD_RUN_DIR", str(tmp_path))
    a = cidmod.allocate_cid("a", probe=False)
    b = cidmod.allocate_cid("b", probe=False)
    assert (a.cid, b.cid) == (3, 4)
    a.release()
    a.release()   # idempotent
    c = cidmod.allocate_cid("c", probe=False)
    assert c.cid == 3
    b.release()
    c.release()
    assert list((tmp_path / "vsock-cids").iterdir()) == []


def test_cids_held_by_another_process_are_skipped(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMPOD_RUN_DIR", str(tmp_path))
    code = ("import sys, time; from kvmpod.vm.cid import allocate_cid; l = allocate_cid('other', False); "
            "print(l.cid, flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "KVMPOD_RUN_DIR": str(tmp_path)}, text=True)
    try:
        assert other.stdout.readline().strip() == "3"
        mine = cidmod.allocate_cid("me", probe=False)
        assert mine.cid == 4
        mine.release()
    finally:
        other.stdin.close()
        other.wait()
    # the other process died without releasing: its file is stale, gc removes it, and 3 is free again
    assert cidmod.remove_stale() == [3]
    again = cidmod.allocate_cid("me", probe=False)
    assert again.cid == 3
    again.release()


def test_probe_skips_cids_in_use(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMPOD_RUN_DIR", str(tmp_path))
    monkeypatch.setattr(cidmod, "cid_in_use", lambda cid: cid in (3, 4))
    lease = cidmod.allocate_cid("p", probe=True)
    assert lease.cid == 5
    lease.release()


@pytest.mark.skipif(not Path("/dev/vhost-vsock").exists(),
                    reason="/dev/vhost-vsock does not exist: the host kernel has no vhost_vsock")
def test_probe_of_an_unused_cid_with_kernel_vsock():
    assert cidmod.cid_in_use(0xFFFF_FFF0) is False


def test_a_libvirt_domain_takes_the_kernels_vsock_or_the_serial_port(tmp_path, no_vhost):
    """libvirt has no vhost-user-vsock: auto without /dev/vhost-vsock is virtio-serial, not kvmpod's
    userspace backend; vsock and vhost-vsock insist on the kernel's, vsock-user is refused."""
    assert tr.libvirt_transport("auto", FakeKernel("y")).kind == tr.SERIAL
    assert tr.libvirt_transport("serial", FakeKernel("y")).kind == tr.SERIAL
    for word in ("vsock", "vhost-vsock"):
        with pytest.raises(VMError, match=rf"^--agent-transport {word}: a libvirt domain's vsock is the kernel's "
                                          r"vhost-vsock: .*does not exist"):
            tr.libvirt_transport(word, FakeKernel("y"))
    with pytest.raises(VMError, match=r"^--agent-transport vsock-user: a libvirt domain has no vhost-user-vsock"):
        tr.libvirt_transport("vsock-user", FakeKernel("y"))
    usable = Path(os.devnull)   # opens read-write: as a usable /dev/vhost-vsock would
    for word in ("auto", "vsock", "vhost-vsock"):
        assert tr.libvirt_transport(word, FakeKernel("y"), device=usable).kind == tr.VHOST_VSOCK
    assert tr.libvirt_transport("auto", FakeKernel(None), device=usable).kind == tr.SERIAL
    with pytest.raises(VMError, match="no virtio-vsock"):
        tr.libvirt_transport("vhost-vsock", FakeKernel(None), device=usable)
