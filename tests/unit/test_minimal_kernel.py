"""The minimal kernel recipe: fragment parsing and verification, the build hash, the up-to-date
check, the PVH note check, host TSC parsing, and that kvmpod/boot/data/minimal.config covers what pods
need. No kernel is built here (that takes minutes)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from kvmpod.boot import kcache, minimal, tsc
from kvmpod.boot.kernel import load_kernel_json
from kvmpod.boot.minimal import build_hash, dropped_options, has_pvh_note, installed_kernel, parse_fragment, verify_config
from kvmpod.boot.tsc import parse_tsc_khz
from kvmpod.errors import KernelError

FRAGMENT_TEXT = minimal.FRAGMENT.read_text()

# What pods need, by family: every option must be set in kvmpod/boot/data/minimal.config as shown.
REQUIRED = {
    "64-bit, SMP": {"CONFIG_64BIT": "y", "CONFIG_SMP": "y"},
    "PVH entry, KVM paravirt": {"CONFIG_PVH": "y", "CONFIG_KVM_GUEST": "y", "CONFIG_PARAVIRT": "y",
                                "CONFIG_HYPERVISOR_GUEST": "y"},
    "ACPI, PCI": {"CONFIG_ACPI": "y", "CONFIG_PCI": "y"},
    "8250 serial console": {"CONFIG_SERIAL_8250": "y", "CONFIG_SERIAL_8250_CONSOLE": "y"},
    "initrd (uncompressed and gzip)": {"CONFIG_BLK_DEV_INITRD": "y", "CONFIG_RD_GZIP": "y"},
    "pseudo file systems": {"CONFIG_DEVTMPFS": "y", "CONFIG_PROC_FS": "y", "CONFIG_SYSFS": "y",
                            "CONFIG_TMPFS": "y", "CONFIG_SHMEM": "y"},
    "runtime syscalls": {name: "y" for name in (
        "CONFIG_FUTEX", "CONFIG_EPOLL", "CONFIG_EVENTFD", "CONFIG_SIGNALFD", "CONFIG_TIMERFD",
        "CONFIG_INOTIFY_USER", "CONFIG_AIO", "CONFIG_IO_URING", "CONFIG_FILE_LOCKING", "CONFIG_SYSVIPC",
        "CONFIG_POSIX_MQUEUE", "CONFIG_SECCOMP", "CONFIG_SECCOMP_FILTER", "CONFIG_POSIX_TIMERS")},
    "namespaces": {name: "y" for name in (
        "CONFIG_NAMESPACES", "CONFIG_UTS_NS", "CONFIG_IPC_NS", "CONFIG_PID_NS", "CONFIG_NET_NS", "CONFIG_USER_NS")},
    "cgroups v2: memory, pids, cpu": {"CONFIG_CGROUPS": "y", "CONFIG_MEMCG": "y", "CONFIG_CGROUP_PIDS": "y",
                                      "CONFIG_CGROUP_SCHED": "y", "CONFIG_FAIR_GROUP_SCHED": "y"},
    "virtio transports": {"CONFIG_VIRTIO_PCI": "y", "CONFIG_VIRTIO_MMIO": "y",
                          "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y"},
    "virtio devices": {"CONFIG_VIRTIO_BLK": "y", "CONFIG_VIRTIO_NET": "y", "CONFIG_VIRTIO_CONSOLE": "y",
                       "CONFIG_HW_RANDOM_VIRTIO": "y"},
    "vsock": {"CONFIG_VSOCKETS": "y", "CONFIG_VIRTIO_VSOCKETS": "y"},
    "pod disk file systems": {"CONFIG_ISO9660_FS": "y", "CONFIG_JOLIET": "y", "CONFIG_OVERLAY_FS": "y",
                              "CONFIG_EXT4_FS": "y"},
    "virtiofs": {"CONFIG_FUSE_FS": "y", "CONFIG_VIRTIO_FS": "y"},
    "9p volumes": {"CONFIG_NET_9P": "y", "CONFIG_NET_9P_VIRTIO": "y", "CONFIG_9P_FS": "y"},
    "networking": {"CONFIG_NET": "y", "CONFIG_UNIX": "y", "CONFIG_INET": "y", "CONFIG_IPV6": "y"},
    "netfilter": {"CONFIG_NETFILTER": "y", "CONFIG_NF_CONNTRACK": "y", "CONFIG_NF_TABLES": "y"},
    "pvpanic": {"CONFIG_PVPANIC": "y", "CONFIG_PVPANIC_PCI": "y", "CONFIG_PVPANIC_MMIO": "y"},
    "sysrq": {"CONFIG_MAGIC_SYSRQ": "y"},
    "32-bit time": {"CONFIG_COMPAT_32BIT_TIME": "y"},
    "executables": {"CONFIG_BINFMT_ELF": "y", "CONFIG_BINFMT_SCRIPT": "y"},
    "printk, ttys, ptys, users": {"CONFIG_PRINTK": "y", "CONFIG_TTY": "y", "CONFIG_UNIX98_PTYS": "y",
                                  "CONFIG_MULTIUSER": "y"},
    "no modules": {"CONFIG_MODULES": None},
}


# --- the fragment file -----------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(REQUIRED))
def test_fragment_covers_family(family):
    options = parse_fragment(FRAGMENT_TEXT)
    wrong = {name: options.get(name, "absent") for name, value in REQUIRED[family].items()
             if name not in options or options[name] != value}
    assert not wrong, f"{family}: {wrong}"


def test_fragment_is_grouped_and_commented():
    sections = [line for line in FRAGMENT_TEXT.splitlines() if line.startswith("# --- ")]
    assert len(sections) >= 10
    assert "# --- virtio transport" in FRAGMENT_TEXT


def test_patches_are_unified_diffs_against_the_tree():
    for patch in kcache.find_patches(minimal.PATCH_DIR):
        text = patch.read_text()
        assert "\n--- a/" in "\n" + text and "\n+++ b/" in text, patch
        assert "\n@@ " in text, patch


# --- parsing and verification --------------------------------------------------------------

def test_parse_fragment_values():
    text = ("# a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=n\n"
            "CONFIG_LOCALVERSION=\"-x\"\nCONFIG_NR=4\n")
    assert parse_fragment(text) == {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": None,
                                    "CONFIG_LOCALVERSION": '"-x"', "CONFIG_NR": "4"}


def test_parse_fragment_rejects_garbage_and_duplicates():
    with pytest.raises(KernelError, match="line 2"):
        parse_fragment("CONFIG_A=y\nA=y\n", "frag")
    with pytest.raises(KernelError, match="CONFIG_A is set twice"):
        parse_fragment("CONFIG_A=y\n# CONFIG_A is not set\n")


DOTCONFIG = """#
# Automatically generated file; DO NOT EDIT.
CONFIG_A=y
CONFIG_LOCALVERSION="-x"
# CONFIG_B is not set
CONFIG_NR=4
"""


def test_verify_config_accepts_exact_match():
    wanted = parse_fragment('CONFIG_A=y\nCONFIG_LOCALVERSION="-x"\n# CONFIG_B is not set\n'
                            "# CONFIG_ABSENT is not set\nCONFIG_NR=4\n")
    verify_config(wanted, DOTCONFIG)
    assert dropped_options(wanted, DOTCONFIG) == []


def test_verify_config_names_a_dropped_option():
    wanted = parse_fragment("CONFIG_A=y\nCONFIG_VIRTIO_MMIO=y\n")
    with pytest.raises(KernelError) as info:
        verify_config(wanted, DOTCONFIG, "minimal.config")
    message = str(info.value)
    assert "CONFIG_VIRTIO_MMIO=y (got: not set)" in message
    assert "CONFIG_A" not in message
    assert "\n" not in message


def test_verify_config_checks_values_and_unset():
    wanted = parse_fragment('CONFIG_NR=8\nCONFIG_LOCALVERSION="-y"\n# CONFIG_A is not set\n')
    dropped = dropped_options(wanted, DOTCONFIG)
    assert dropped == ["CONFIG_NR=8 (got: 4)", 'CONFIG_LOCALVERSION="-y" (got: "-x")',
                       "CONFIG_A unset (got: y)"]


def test_a_module_is_not_built_in():
    with pytest.raises(KernelError, match="CONFIG_A=y"):
        verify_config({"CONFIG_A": "y"}, "CONFIG_A=m\n")


# --- the build hash ----------------------------------------------------------------------------

def test_build_hash_is_stable_and_covers_all_inputs():
    base = build_hash(b"CONFIG_A=y\n", "6.1.192-2", [("0001-x.patch", b"diff")])
    assert base == build_hash(b"CONFIG_A=y\n", "6.1.192-2", [("0001-x.patch", b"diff")])
    assert len(base) == 64
    variants = [
        build_hash(b"CONFIG_A=y\nCONFIG_B=y\n", "6.1.192-2", [("0001-x.patch", b"diff")]),
        build_hash(b"CONFIG_A=y\n", "6.1.193-1", [("0001-x.patch", b"diff")]),
        build_hash(b"CONFIG_A=y\n", "6.1.192-2", [("0001-x.patch", b"diff2")]),
        build_hash(b"CONFIG_A=y\n", "6.1.192-2", [("0002-x.patch", b"diff")]),
        build_hash(b"CONFIG_A=y\n", "6.1.192-2", []),
        build_hash(b"CONFIG_A=y\n", "6.1.192-2", [("0001-x.patch", b"diff"), ("0002-y.patch", b"")]),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_build_hash_has_no_ambiguous_concatenation():
    assert build_hash(b"ab", "c", []) != build_hash(b"a", "bc", [])


def test_build_hash_covers_the_recipe_version(monkeypatch):
    before = build_hash(b"x", "1", [])
    monkeypatch.setattr(minimal, "RECIPE_VERSION", minimal.RECIPE_VERSION + 1)
    assert build_hash(b"x", "1", []) != before


# --- the cache entry and the up-to-date check --------------------------------------------------

def _entry(root: Path, digest: str, release: str = "6.1.192-kvmpod", files=("vmlinux", "bzImage", "config")) -> Path:
    entry = root / minimal.dir_name(release, digest)
    entry.mkdir(parents=True)
    for name in files:
        (entry / name).write_bytes(b"x")
    (entry / "kernel.json").write_text(json.dumps({
        "kind": "minimal", "version": release, "image": "vmlinux", "bzimage": "bzImage",
        "config": "config", "modules": None, "fragment_sha256": digest}))
    return entry


def test_installed_kernel_matches_the_full_hash(tmp_path):
    digest = "ab" * 32
    entry = _entry(tmp_path, digest)
    assert installed_kernel(tmp_path, digest) == entry
    assert installed_kernel(tmp_path, "ab" * 4 + "cd" * 28) is None  # same 8-char prefix, other hash
    assert installed_kernel(tmp_path, "cd" * 32) is None


def test_installed_kernel_ignores_incomplete_entries(tmp_path):
    digest = "ef" * 32
    _entry(tmp_path, digest, files=("vmlinux", "config"))  # no bzImage
    assert installed_kernel(tmp_path, digest) is None


def test_installed_entry_is_a_usable_kernel_json(tmp_path):
    entry = _entry(tmp_path, "12" * 32)
    kernel = load_kernel_json(entry)
    assert kernel.kind == "minimal" and kernel.modules_dir is None and kernel.image == entry / "vmlinux"


def test_build_does_nothing_when_inputs_are_unchanged(tmp_path, monkeypatch):
    fragment = tmp_path / "minimal.config"
    fragment.write_text("CONFIG_A=y\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-a.patch").write_bytes(b"--- a/x\n+++ b/x\n")
    monkeypatch.setattr(minimal, "source_version", lambda package=minimal.SOURCE_PACKAGE: "6.1.192-2")

    def no_make(*args, **kwargs):
        raise AssertionError("make must not run")

    monkeypatch.setattr(minimal, "_make", no_make)
    digest = build_hash(b"CONFIG_A=y\n", "6.1.192-2", [("0001-a.patch", b"--- a/x\n+++ b/x\n")])
    entry = _entry(tmp_path / "cache" / "kernels", digest)
    logs: list[str] = []
    got = minimal.build(tmp_path / "cache", fragment_path=fragment, patch_dir=patches, log=logs.append)
    assert got == entry
    assert "up to date" in logs[-1]

    # A changed fragment is a different kernel: now it must build (and so call make).
    fragment.write_text("CONFIG_A=y\nCONFIG_B=y\n")
    monkeypatch.setattr(minimal, "_unpack", lambda *a, **k: None)
    with pytest.raises(AssertionError, match="make must not run"):
        minimal.build(tmp_path / "cache", fragment_path=fragment, patch_dir=patches, log=logs.append)


def test_missing_source_package_is_a_kernel_error(monkeypatch):
    with pytest.raises(KernelError, match="no-such-linux-source-pkg"):
        minimal.source_version("no-such-linux-source-pkg")


# --- the PVH note --------------------------------------------------------------------------------

def _elf_with_note(path: Path, name: bytes, ntype: int) -> Path:
    desc = struct.pack("<I", 0x1000000)
    namesz = len(name) + 1
    note = struct.pack("<III", namesz, len(desc), ntype) + (name + b"\0").ljust((namesz + 3) // 4 * 4, b"\0") + desc
    ehdr = bytearray(64)
    ehdr[:4] = b"\x7fELF"
    ehdr[4], ehdr[5] = 2, 1
    struct.pack_into("<Q", ehdr, 0x20, 64)           # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)       # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 64 + 56, 0, 0, len(note), len(note), 4)
    path.write_bytes(bytes(ehdr) + phdr + note)
    return path


def test_pvh_note_found(tmp_path):
    assert has_pvh_note(_elf_with_note(tmp_path / "vmlinux", b"Xen", minimal.XEN_ELFNOTE_PHYS32_ENTRY))


def test_pvh_note_missing(tmp_path):
    assert not has_pvh_note(_elf_with_note(tmp_path / "a", b"Xen", 5))
    assert not has_pvh_note(_elf_with_note(tmp_path / "b", b"Linux", minimal.XEN_ELFNOTE_PHYS32_ENTRY))
    (tmp_path / "bz").write_bytes(b"MZ" + b"\0" * 600)
    assert not has_pvh_note(tmp_path / "bz")
    assert not has_pvh_note(tmp_path / "missing")


# --- host TSC frequency ----------------------------------------------------------------------------

def test_tsc_from_dmesg_prefers_refined():
    dmesg = ("[    0.000058] tsc: Detected 2596.122 MHz processor\n"
             "[    1.2] tsc: Refined TSC clocksource calibration: 2595.998 MHz\n")
    assert parse_tsc_khz(dmesg) == 2595998
    assert parse_tsc_khz("[    0.000058] tsc: Detected 2596.1 MHz processor\n") == 2596100


def test_tsc_from_cpuinfo_needs_constant_tsc():
    cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2596.122\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n"
    assert parse_tsc_khz("", cpuinfo) == 2596122
    assert parse_tsc_khz("", cpuinfo.replace(" constant_tsc", "")) is None
    assert parse_tsc_khz("", "") is None


def test_host_tsc_khz_is_plausible():
    khz = tsc.host_tsc_khz()
    assert khz is None or 100_000 < khz < 10_000_000
