"""Boot assets: cpio writer, module closure, kernel search, initrd cache, agent search, distro
kernel install. No VM, no network, no root."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kvmpod import paths
from kvmpod.boot import distro, initrd, kcache, kernel, modules
from kvmpod.boot.initrd import CpioWriter, build_initrd, find_agent
from kvmpod.boot.kernel import GuestKernel, find_kernel
from kvmpod.boot.modules import guest_module_names, parse_module_list, resolve_modules
from kvmpod.errors import ConfigError, KernelError



# --- helpers -------------------------------------------------------------------------------

def read_cpio(data: bytes) -> list[dict]:
    """A tiny newc reader: [{name, mode, size, data, rdev, mtime, uid, gid}], trailer excluded."""
    entries, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        _ino, mode, uid, gid, _nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, check = fields
        assert check == 0
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries.append({"name": name, "mode": mode, "size": size, "data": body, "rdev": (rmaj, rmin),
                        "mtime": mtime, "uid": uid, "gid": gid})


FAKE_DEP = """\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/misc/pvpanic/pvpanic.ko:
kernel/drivers/misc/pvpanic/pvpanic-pci.ko: kernel/drivers/misc/pvpanic/pvpanic.ko
kernel/fs/isofs/isofs.ko: kernel/drivers/cdrom/cdrom.ko
kernel/drivers/cdrom/cdrom.ko:
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def full_fake_dep() -> str:
    """FAKE_DEP plus a dependency-free entry for every other module in guest-modules.txt."""
    have = {modules.module_name(line.split(":")[0]) for line in FAKE_DEP.splitlines()} | {"overlay"}  # built in
    extra = [f"kernel/extra/{n}.ko:\n" for n in guest_module_names() if modules.module_name(n) not in have]
    return FAKE_DEP + "".join(extra)


def make_modules_dir(root: Path, dep: str = FAKE_DEP, builtin: str | None = "kernel/fs/overlayfs/overlay.ko\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "modules.dep").write_text(dep)
    if builtin is not None:
        (root / "modules.builtin").write_text(builtin)
    for line in dep.splitlines():
        rel = line.split(":")[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x7fELF fake module " + rel.encode())
    return root


def make_kernel_dir(root: Path, kind: str, version: str, with_modules: bool = False) -> Path:
    root.mkdir(parents=True)
    (root / "bzImage").write_bytes(b"fake kernel " + version.encode())
    (root / "config").write_text(f"# Linux/x86 {version} Kernel Configuration\nCONFIG_VIRTIO_PCI=y\n"
                                 "# CONFIG_DEBUG_INFO is not set\nCONFIG_LOCALVERSION=\"-kvmpod\"\n")
    meta = {"kind": kind, "version": version, "image": "bzImage", "config": "config", "modules": None}
    if with_modules:
        make_modules_dir(root / "modules", full_fake_dep())
        meta["modules"] = "modules"
    (root / "kernel.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Hermetic cache/config: everything under tmp_path, no system-wide config file."""
    monkeypatch.setenv("KVMPOD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KVMPOD_KERNEL", raising=False)
    monkeypatch.delenv("KVMPOD_CONFIG", raising=False)
    monkeypatch.delenv("KVMPOD_AGENT", raising=False)
    real_config_files = paths.config_files
    monkeypatch.setattr(paths, "config_files",
                        lambda: [p for p in real_config_files() if tmp_path in p.parents])
    return tmp_path


# --- cpio ----------------------------------------------------------------------------------

def test_cpio_roundtrip_and_parents_first():
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_file("/etc/kvmpod/modules", b"a\nb\n")
    w.add_file("init", b"\x7fELF" + b"x" * 5, 0o755)
    w.add_dir("dev")
    w.add_chardev("dev/console", 5, 1)
    w.add_symlink("bin/sh", "/init")
    w.add_file("empty", b"")
    w.close()
    entries = read_cpio(buf.getvalue())
    names = [e["name"] for e in entries]
    assert names == ["etc", "etc/kvmpod", "etc/kvmpod/modules", "init", "dev", "dev/console", "bin", "bin/sh", "empty"]
    by = {e["name"]: e for e in entries}
    assert by["etc/kvmpod/modules"]["data"] == b"a\nb\n"
    assert by["init"]["mode"] == stat.S_IFREG | 0o755 and by["init"]["size"] == 9
    assert stat.S_ISDIR(by["etc"]["mode"])
    assert stat.S_ISCHR(by["dev/console"]["mode"]) and by["dev/console"]["rdev"] == (5, 1)
    assert stat.S_ISLNK(by["bin/sh"]["mode"]) and by["bin/sh"]["data"] == b"/init"
    assert all(e["mtime"] == 0 and e["uid"] == 0 and e["gid"] == 0 for e in entries)
    assert len(buf.getvalue()) % 4 == 0


def test_cpio_rejects_bad_names():
    w = CpioWriter(io.BytesIO())
    for bad in ("", "/", "a/../b", "a//b", "./x"):
        with pytest.raises(ValueError):
            w.add_file(bad, b"")


@pytest.mark.skipif(not shutil.which("cpio"), reason="cpio not installed")
def test_cpio_readable_by_gnu_cpio(tmp_path):
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_file("init", b"#!/bin/sh\n", 0o755)
    w.add_file("lib/modules/kernel/x.ko", b"ko")
    w.close()
    out = subprocess.run(["cpio", "-it", "--quiet"], input=buf.getvalue(), capture_output=True, check=True).stdout
    assert out.decode().split() == ["init", "lib", "lib/modules", "lib/modules/kernel", "lib/modules/kernel/x.ko"]
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=buf.getvalue(),
                   cwd=tmp_path, check=True)
    assert (tmp_path / "lib/modules/kernel/x.ko").read_bytes() == b"ko"
    assert os.stat(tmp_path / "init").st_mode & 0o777 == 0o755


# --- module closure ------------------------------------------------------------------------

def test_resolve_modules_dependencies_first_each_once(tmp_path):
    mdir = make_modules_dir(tmp_path / "m")
    got = resolve_modules(mdir, ["virtio_pci", "virtio_blk", "virtio_pci"])
    rel = [str(p.relative_to(mdir.resolve())) for p in got]
    assert all(p.is_absolute() for p in got)
    assert rel == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
        "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
        "kernel/drivers/block/virtio_blk.ko",
    ]


def test_resolve_modules_order_independent_of_depmod_order(tmp_path):
    # Dependencies listed shallowest-last (not depmod's order): still a valid load order.
    dep = "kernel/c.ko: kernel/a.ko kernel/b.ko\nkernel/b.ko: kernel/a.ko\nkernel/a.ko:\n"
    rel = [p.name for p in resolve_modules(make_modules_dir(tmp_path / "m", dep), ["c"])]
    assert rel == ["a.ko", "b.ko", "c.ko"]


def test_resolve_modules_dash_underscore_and_builtin(tmp_path):
    mdir = make_modules_dir(tmp_path / "m")
    assert [p.name for p in resolve_modules(mdir, ["pvpanic_pci"])] == ["pvpanic.ko", "pvpanic-pci.ko"]
    assert [p.name for p in resolve_modules(mdir, ["pvpanic-pci"])] == ["pvpanic.ko", "pvpanic-pci.ko"]
    assert resolve_modules(mdir, ["overlay"]) == []  # built in: skipped silently


def test_resolve_modules_unknown_module(tmp_path):
    mdir = make_modules_dir(tmp_path / "m")
    with pytest.raises(KernelError, match=r"'vsock'.*modules\.dep") as exc:
        resolve_modules(mdir, ["virtio_blk", "vsock"])
    assert "\n" not in str(exc.value) and str(mdir) in str(exc.value)
    with pytest.raises(KernelError, match="no modules.dep in"):
        resolve_modules(tmp_path / "nowhere", ["x"])


def test_resolve_modules_without_builtin_file(tmp_path):
    mdir = make_modules_dir(tmp_path / "m", builtin=None)
    with pytest.raises(KernelError, match="overlay"):
        resolve_modules(mdir, ["overlay"])


def _cached_distro_modules() -> Path | None:
    distro_kernels = [k for k in kernel.cached_kernels() if k.kind == "distro" and k.modules_dir]
    return distro_kernels[0].modules_dir if distro_kernels else None


@pytest.mark.skipif(_cached_distro_modules() is None,
                    reason="no Debian cloud kernel in the cache: `make kernel-distro` (make setup) installs it")
def test_resolve_guest_modules_on_real_debian_kernel():
    modules_dir = _cached_distro_modules()
    assert modules_dir is not None
    got = resolve_modules(modules_dir, guest_module_names())
    names = [p.name for p in got]
    assert len(names) == len(set(names))
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_pci.ko")
    assert names.index("cdrom.ko") < names.index("isofs.ko")
    assert {"virtio_blk.ko", "virtio_console.ko", "overlay.ko", "pvpanic-pci.ko"} <= set(names)


def test_guest_module_list_format():
    from kvmpod.boot.modules import MODULE_LIST

    text = MODULE_LIST.read_text()
    names = guest_module_names()
    assert {"virtio_pci", "virtio_blk", "virtio_console", "isofs", "overlay", "pvpanic-pci"} <= set(names)
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, why = line.partition("#")
            assert len(name.split()) == 1 and sep and why.strip(), f"need one name and a comment: {line!r}"
    assert parse_module_list("a # x\n\n# only comment\n  b\n") == ["a", "b"]


# --- kernel search -------------------------------------------------------------------------

def test_search_order(env, monkeypatch):
    cache = env / "cache" / "kernels"
    make_kernel_dir(cache / "debian-cloud-6.1.0-9-cloud-amd64", "distro", "6.1.0-9-cloud-amd64")
    make_kernel_dir(cache / "debian-cloud-6.1.0-56-cloud-amd64", "distro", "6.1.0-56-cloud-amd64")
    # 4: the cache, highest distro version (natural order: 56 > 9)
    assert find_kernel().version == "6.1.0-56-cloud-amd64"
    make_kernel_dir(cache / "minimal-6.1.0", "minimal", "6.1.0")
    assert find_kernel().kind == "minimal"  # minimal beats a higher distro version
    (cache / ".fetch-x").mkdir()  # in-progress fetches and broken entries are ignored
    (cache / "broken").mkdir()
    (cache / "broken" / "kernel.json").write_text("{")
    assert find_kernel().kind == "minimal"

    # 3: config files, later ones win; relative paths are relative to the config file
    make_kernel_dir(env / "k-xdg", "custom", "1.0-xdg")
    make_kernel_dir(env / "conf" / "k-env", "custom", "1.0-envconf")
    (env / "xdg" / "kvmpod").mkdir(parents=True)
    (env / "xdg" / "kvmpod" / "kvmpod.toml").write_text(f'kernel = "{env / "k-xdg"}"\n')
    assert find_kernel().version == "1.0-xdg"
    (env / "conf" / "kvmpod.toml").write_text('[other]\nx = 1\n')
    monkeypatch.setenv("KVMPOD_CONFIG", str(env / "conf" / "kvmpod.toml"))
    assert find_kernel().version == "1.0-xdg"  # no kernel key there: the earlier file holds
    (env / "conf" / "kvmpod.toml").write_text('kernel = "k-env"\n')
    assert find_kernel().version == "1.0-envconf"

    # 2: KVMPOD_KERNEL beats config
    make_kernel_dir(env / "k-env-var", "custom", "2.0")
    monkeypatch.setenv("KVMPOD_KERNEL", str(env / "k-env-var"))
    assert find_kernel().version == "2.0"

    # 1: explicit beats everything; a cache entry name or a kind also works
    assert find_kernel(str(cache / "debian-cloud-6.1.0-9-cloud-amd64")).version == "6.1.0-9-cloud-amd64"
    assert find_kernel("debian-cloud-6.1.0-9-cloud-amd64").version == "6.1.0-9-cloud-amd64"
    assert find_kernel("distro").version == "6.1.0-56-cloud-amd64"
    assert find_kernel(str(cache / "minimal-6.1.0" / "kernel.json")).kind == "minimal"


def test_kernel_fields_and_config(env):
    d = make_kernel_dir(env / "k", "minimal", "6.1.0", with_modules=True)
    k = find_kernel(str(d))
    assert isinstance(k, GuestKernel)
    assert k.image == d / "bzImage" and k.modules_dir == d / "modules"
    assert k.option("CONFIG_VIRTIO_PCI") == "y" and k.option("VIRTIO_PCI") == "y"
    assert k.option("DEBUG_INFO") is None and k.option("NOPE") is None
    assert k.option("LOCALVERSION") == "-kvmpod"
    hash(k)  # frozen and hashable despite the config mapping


def test_kernel_config_is_parsed_when_first_used(env, monkeypatch):
    """Finding the kernel reads every cached kernel's description; only the chosen one's .config is
    parsed, and only once (a missing one is still an error when the kernel is found: skipped in the cache)."""
    cache = env / "cache" / "kernels"
    make_kernel_dir(cache / "debian-cloud-6.1.0-56-cloud-amd64", "distro", "6.1.0-56-cloud-amd64")
    make_kernel_dir(cache / "minimal-6.1.0", "minimal", "6.1.0")
    parsed: list[int] = []
    real_parse = kernel.parse_kernel_config
    monkeypatch.setattr(kernel, "parse_kernel_config", lambda text: parsed.append(len(text)) or real_parse(text))
    k = find_kernel()
    assert k.kind == "minimal" and parsed == []
    assert k.option("VIRTIO_PCI") == "y" and k.option("NOPE") is None and len(k.config) > 0
    assert len(parsed) == 1   # the distro kernel's config was never parsed, the minimal one's once
    assert dict(k.config) == real_parse((cache / "minimal-6.1.0" / "config").read_text())
    (cache / "minimal-6.1.0" / "config").unlink()   # a kernel whose config is gone: skipped, as before
    assert find_kernel().kind == "distro"
    (cache / "debian-cloud-6.1.0-56-cloud-amd64" / "config").unlink()
    with pytest.raises(KernelError, match=r"cannot read kernel config .*config: No such file"):
        find_kernel(str(cache / "debian-cloud-6.1.0-56-cloud-amd64"))


def test_kernel_image_file_is_custom(env):
    d = env / "boot"
    d.mkdir()
    (d / "vmlinuz-6.1.0-56-cloud-amd64").write_bytes(b"not really a kernel")
    (d / "config-6.1.0-56-cloud-amd64").write_text("CONFIG_ISO9660_FS=m\n")
    k = find_kernel(str(d / "vmlinuz-6.1.0-56-cloud-amd64"))
    assert (k.kind, k.version, k.modules_dir) == ("custom", "6.1.0-56-cloud-amd64", None)
    assert k.option("ISO9660_FS") == "m"


def test_bzimage_version_from_setup_header(env):
    image = bytearray(0x1000)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x300).to_bytes(2, "little")
    version = b"6.1.99-kvmpod (root@host) #1 SMP\0"
    image[0x500:0x500 + len(version)] = version
    (env / "bzImage").write_bytes(bytes(image))
    (env / "config").write_text("CONFIG_VIRTIO=y\n")
    k = find_kernel(str(env / "bzImage"))
    assert k.version == "6.1.99-kvmpod" and k.option("VIRTIO") == "y"


def test_kernel_errors(env, monkeypatch):
    with pytest.raises(KernelError, match="kvmpod setup") as exc:
        find_kernel()
    assert "\n" not in str(exc.value)
    with pytest.raises(KernelError, match=r"/no/such/vmlinuz.*--kernel"):
        find_kernel("/no/such/vmlinuz")
    monkeypatch.setenv("KVMPOD_KERNEL", str(env / "gone"))
    with pytest.raises(KernelError, match=r"gone.*KVMPOD_KERNEL"):
        find_kernel()
    monkeypatch.delenv("KVMPOD_KERNEL")
    d = make_kernel_dir(env / "k", "distro", "1")
    (d / "bzImage").unlink()
    with pytest.raises(KernelError, match=r"kernel image .*bzImage.* does not exist"):
        find_kernel(str(d))
    (env / "empty").mkdir()
    with pytest.raises(KernelError, match="no kernel.json in"):
        find_kernel(str(env / "empty"))
    monkeypatch.setenv("KVMPOD_CONFIG", str(env / "bad.toml"))
    (env / "bad.toml").write_text("kernel = \n")
    with pytest.raises(ConfigError, match="invalid TOML.*bad.toml"):
        find_kernel()


# --- initrd --------------------------------------------------------------------------------

@pytest.fixture
def kernel_with_modules(env) -> GuestKernel:
    d = make_kernel_dir(env / "k", "distro", "6.1.0", with_modules=True)
    return find_kernel(str(d))


def test_initrd_contents(env, kernel_with_modules):
    agent = env / "agent"
    agent.write_bytes(b"\x7fELF agent")
    path = build_initrd(agent, kernel_with_modules, modules=["virtio_blk", "pvpanic-pci", "overlay"])
    assert path.parent == env / "cache" / "initrd" and path.name.endswith(".cpio")
    entries = read_cpio(path.read_bytes())
    by = {e["name"]: e for e in entries}
    assert by["init"]["data"] == b"\x7fELF agent" and by["init"]["mode"] == stat.S_IFREG | 0o755
    listed = by["etc/kvmpod/modules"]["data"].decode().splitlines()
    assert listed == [
        "lib/modules/kernel/drivers/virtio/virtio_ring.ko",
        "lib/modules/kernel/drivers/virtio/virtio.ko",
        "lib/modules/kernel/drivers/block/virtio_blk.ko",
        "lib/modules/kernel/drivers/misc/pvpanic/pvpanic.ko",
        "lib/modules/kernel/drivers/misc/pvpanic/pvpanic-pci.ko",
    ]
    for name in listed:
        assert by[name]["data"].endswith(name.removeprefix("lib/modules/").encode())
    for d in ("dev", "proc", "sys", "run", "etc", "etc/kvmpod", "lib"):
        assert stat.S_ISDIR(by[d]["mode"]), d
    assert by["dev/console"]["rdev"] == (5, 1)
    names = [e["name"] for e in entries]
    for i, name in enumerate(names):  # every parent directory comes before its entries
        parent = name.rpartition("/")[0]
        assert not parent or parent in names[:i]


def test_initrd_default_module_list(env, kernel_with_modules):
    agent = env / "agent"
    agent.write_bytes(b"agent")
    entries = {e["name"]: e for e in read_cpio(build_initrd(agent, kernel_with_modules).read_bytes())}
    listed = entries["etc/kvmpod/modules"]["data"].decode().splitlines()
    assert "lib/modules/kernel/fs/isofs/isofs.ko" in listed  # from initrd/guest-modules.txt


def test_initrd_cache_hit(env, kernel_with_modules, monkeypatch):
    agent = env / "agent"
    agent.write_bytes(b"agent v1")
    first = build_initrd(agent, kernel_with_modules)
    before = first.stat()
    with monkeypatch.context() as m:
        m.setattr(initrd, "_write_archive", lambda *a: pytest.fail("cache miss"))
        second = build_initrd(agent, kernel_with_modules)
    assert second == first
    after = second.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    agent.write_bytes(b"agent v2")
    third = build_initrd(agent, kernel_with_modules)
    assert third != first and first.exists()
    assert not list((env / "cache" / "initrd").glob(".tmp-*"))


def test_initrd_gzip_and_reproducible(env, kernel_with_modules, monkeypatch):
    agent = env / "agent"
    agent.write_bytes(b"agent")
    plain = build_initrd(agent, kernel_with_modules, "none")
    packed = build_initrd(agent, kernel_with_modules, "gzip")
    assert packed.name.endswith(".cpio.gz") and packed.name.split(".")[0] == plain.name.split(".")[0]
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    monkeypatch.setenv("KVMPOD_CACHE_DIR", str(env / "other-cache"))
    again = build_initrd(agent, kernel_with_modules, "gzip")
    assert again != packed and again.read_bytes() == packed.read_bytes()
    with pytest.raises(KernelError, match="compression"):
        build_initrd(agent, kernel_with_modules, "xz")


def test_initrd_builtin_kernel_has_no_modules(env):
    k = find_kernel(str(make_kernel_dir(env / "k", "minimal", "6.1.0")))
    agent = env / "agent"
    agent.write_bytes(b"agent")
    entries = {e["name"]: e for e in read_cpio(build_initrd(agent, k).read_bytes())}
    assert entries["etc/kvmpod/modules"]["data"] == b""


def test_initrd_missing_agent(env, kernel_with_modules):
    with pytest.raises(KernelError, match=r"guest agent .*/nope"):
        build_initrd(env / "nope", kernel_with_modules)


def _executable(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o755)
    return path


def test_find_agent_order(env, monkeypatch):
    """$KVMPOD_AGENT, the package's own copy (a wheel), the checkout's build, the system copy."""
    from kvmpod import resources

    repo, system, libexec = env / "repo", env / "usr-lib", env / "site-packages" / "kvmpod" / "libexec"
    monkeypatch.setattr(resources, "checkout", lambda: repo)
    monkeypatch.setattr(resources, "SYSTEM_LIBEXEC", system)
    monkeypatch.setattr(resources, "LIBEXEC", libexec)
    with pytest.raises(KernelError, match="guest agent binary not found: run `make agent`"):
        find_agent()
    (system / "kvmpod-agent").parent.mkdir(parents=True)
    (system / "kvmpod-agent").write_bytes(b"not executable")
    with pytest.raises(KernelError, match="guest agent binary not found"):
        find_agent()
    _executable(system / "kvmpod-agent", b"sys")
    assert find_agent() == system / "kvmpod-agent"
    built = _executable(repo / "guest-agent" / "build" / "kvmpod-agent", b"built")
    assert find_agent() == built
    packaged = _executable(libexec / "kvmpod-agent", b"wheel")
    assert find_agent() == packaged
    monkeypatch.setattr(resources, "checkout", lambda: None)  # an installed package names no make target
    packaged.unlink()
    (system / "kvmpod-agent").unlink()
    with pytest.raises(KernelError, match=f"guest agent binary not found: this kvmpod installation lacks "
                                          f"{libexec / 'kvmpod-agent'}: reinstall kvmpod"):
        find_agent()
    monkeypatch.setenv("KVMPOD_AGENT", str(env / "custom-agent"))
    with pytest.raises(KernelError, match="custom-agent"):
        find_agent()
    (env / "custom-agent").write_bytes(b"custom")
    assert find_agent() == env / "custom-agent"


# --- distro kernel install (apt, dpkg and depmod faked) ------------------------------------

VERSION = "6.1.0-56-cloud-amd64"


def fake_unpacked_package(root: Path) -> None:
    moddir = root / "lib" / "modules" / VERSION
    make_modules_dir(moddir, full_fake_dep() + "kernel/net/unrelated.ko:\n", builtin="kernel/fs/overlayfs/overlay.ko\n")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{VERSION}").write_bytes(b"vmlinuz")
    (root / "boot" / f"System.map-{VERSION}").write_text("map")
    (root / "boot" / f"config-{VERSION}").write_text("CONFIG_VIRTIO_BLK=m\n")


@pytest.fixture
def fake_apt(env, monkeypatch):
    calls: list[list[str]] = []

    def run(cmd, cwd=None):
        calls.append(cmd)
        if cmd[:2] == ["apt-cache", "show"]:
            return (f"Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n"
                    f"Depends: linux-image-{VERSION} (= 6.1.192-2)\n\n")
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / f"linux-image-{VERSION}_6.1.192-2_amd64.deb").write_bytes(b"deb")
            return ""
        if cmd[:2] == ["dpkg", "-x"]:
            fake_unpacked_package(Path(cmd[3]))
            return ""
        raise AssertionError(f"unexpected command {cmd}")

    monkeypatch.setattr(kcache, "run_tool", run)
    return calls


def test_distro_fetch_installs_only_guest_modules(env, fake_apt):
    kdir = distro.fetch(log=lambda msg: None)
    assert kdir == env / "cache" / "kernels" / f"debian-cloud-{VERSION}"
    meta = json.loads((kdir / "kernel.json").read_text())
    assert meta | {"guest_modules": None} == {
        "kind": "distro", "version": VERSION, "image": "vmlinuz", "config": "config", "modules": "modules",
        "system_map": "System.map", "package": f"linux-image-{VERSION}", "package_version": "6.1.192-2",
        "guest_modules": None}
    assert (kdir / "vmlinuz").read_bytes() == b"vmlinuz" and (kdir / "System.map").is_file()
    assert not (kdir / "modules" / "kernel" / "net" / "unrelated.ko").exists()
    dep = (kdir / "modules" / "modules.dep").read_text()
    assert "unrelated" not in dep and "kernel/drivers/cdrom/cdrom.ko:" in dep
    assert sorted(p.name for p in kdir.iterdir()) == ["System.map", "config", "kernel.json", "modules", "vmlinuz"]
    assert sorted(p.name for p in kdir.parent.iterdir()) == [".lock", kdir.name]  # no work dirs left
    k = find_kernel()
    assert (k.kind, k.version, k.option("VIRTIO_BLK")) == ("distro", VERSION, "m")
    assert [p.name for p in resolve_modules(k.modules_dir, ["isofs"])] == ["cdrom.ko", "isofs.ko"]

    # second run: up to date, nothing downloaded
    n = len(fake_apt)
    messages: list[str] = []
    assert distro.fetch(log=messages.append) == kdir
    assert [c[:2] for c in fake_apt[n:]] == [["apt-cache", "show"]]
    assert "up to date" in messages[-1]


def test_distro_fetch_refetches_when_guest_modules_grow(env, fake_apt, monkeypatch):
    kdir = distro.fetch(log=lambda msg: None)
    (kdir / "modules" / "kernel" / "fs" / "isofs" / "isofs.ko").unlink()
    (kdir / "modules" / "modules.dep").write_text("kernel/drivers/misc/pvpanic/pvpanic.ko:\n")  # an older set
    assert not distro.is_up_to_date(kdir, f"linux-image-{VERSION}", "6.1.192-2", guest_module_names())
    distro.fetch(log=lambda msg: None)
    assert (kdir / "modules" / "kernel" / "fs" / "isofs" / "isofs.ko").is_file()


def test_distro_errors_are_one_line(env, monkeypatch):
    with pytest.raises(KernelError) as exc:
        kcache.run_tool(["sh", "-c", "echo first >&2; echo 'E: the real reason' >&2; exit 100"])
    msg = str(exc.value)
    assert "\n" not in msg and "exit 100" in msg and "E: the real reason" in msg and "sh -c" in msg
    with pytest.raises(KernelError, match="not found: install"):
        kcache.run_tool(["kvmpod-no-such-tool"])
    monkeypatch.setattr(kcache, "run_tool", lambda cmd, cwd=None: "Package: linux-image-cloud-amd64\nDepends: foo\n")
    with pytest.raises(KernelError, match="no linux-image package"):
        distro.resolve_package()


def test_module_name():
    assert modules.module_name("kernel/drivers/misc/pvpanic/pvpanic-pci.ko") == "pvpanic_pci"
    assert modules.module_name("kernel/fs/isofs/isofs.ko.xz") == "isofs"
    config = kernel.parse_kernel_config('CONFIG_A="x \\"y\\""\nCONFIG_B=0x10\n# CONFIG_C is not set\n')
    assert config == {"CONFIG_A": 'x "y"', "CONFIG_B": "0x10"}
