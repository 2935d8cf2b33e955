"""Build kvmpod's own QEMU: `kvmpod setup --qemu-only` (`make qemu`; or `python -m kvmpod.vm.qemu_build build`).

Why: Debian's qemu-system-x86_64 has every board, device, display, audio and storage back-end QEMU
offers, linked against ~50 libraries. kvmpod uses two machines and a dozen virtio devices, but
every pod's QEMU pays for the rest: the libraries are loaded and relocated, and every device type
is registered at start. On an idle busybox pod under TCG, QEMU took 62 MiB PSS with Debian's binary
and 48 MiB with this one, and pods start ~15 ms sooner. (Debian's qemu-system-x86_64-microvm is the
same idea, but has neither TCG nor the pc machine the distro kernel boots on.)

What is built is the source package of the installed qemu-system-x86: Debian's version with
Debian's patches, so this binary carries the same security fixes as the one apt keeps up to date.

1. `apt-get source --download-only qemu=<version>`, with the host's apt sources copied as deb-src
   entries into a private apt directory (apt checks the archive's signature and every file's hash),
   then `dpkg-source -x`, which applies Debian's patches, into <cache>/build/qemu-<version>/src, and
   then kvmpod's own (PATCH_DIR, in name order: what each does is in its header and docs/qemu.md);
2. configure: x86_64-softmmu only, --without-default-features and --without-default-devices, plus
   FEATURES and the device list DEVICES (written as configs/devices/x86_64-softmmu/kvmpod.mak);
3. `make qemu-system-x86_64` (~2 min on 2 cores), then strip. The binary must offer every machine
   and device kvmpod asks for (REQUIRED_MACHINES, REQUIRED_DEVICES), or the build fails naming what
   is missing;
4. installed atomically as <cache>/qemu/kvmpod-qemu-<version>-<hash8>/ with qemu.json.

The hash covers RECIPE_VERSION, the source version, FEATURES, DEVICES and kvmpod's patches: when none
changed, `build` does nothing. qemu.json also records the identity (size, mtime) of Debian's binary at
build time.
Which binary a pod runs is decided by kvmpod/vm/qemu_binary.py. docs/qemu.md has the details.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvmpod import paths
from kvmpod.boot import kcache
from kvmpod.errors import QemuBuildError
from kvmpod.vm.qemu_binary import (BUILD_JSON, DEBIAN_QEMU, DIR_PREFIX, QEMU_NAME, binary_identity, qemu_dir,
                                   read_build_meta)

BINARY_PACKAGE = "qemu-system-x86"   # its source package is what gets built
SOURCE_PACKAGE = "qemu"
# Bump when the build steps change what comes out for the same source, features and devices.
RECIPE_VERSION = 1
BUILD_LOG = "build.log"   # make's output, kept in the installed build's directory
PATCH_DIR = Path(__file__).parent / "data" / "qemu-patches"   # kvmpod's own, applied after Debian's
# What the build needs (`make deps` installs them): Debian's source tools, QEMU's build system and
# the libraries FEATURES link against.
BUILD_PACKAGES = ("dpkg-dev", "build-essential", "python3", "meson", "ninja-build", "pkg-config", "binutils",
                  "libglib2.0-dev", "libpixman-1-dev", "libslirp-dev", "libfdt-dev", "libcap-ng-dev",
                  "libattr1-dev", "libseccomp-dev", "xz-utils", "patch")

# configure options besides the target and the device list. Everything not named here is off.
FEATURES = (
    "--enable-tcg",                  # software emulation: CI runners, nested or PVM-only hosts
    "--enable-kvm",
    "--enable-slirp",                # --net user
    "--enable-vhost-net", "--enable-vhost-kernel",   # tap networks with in-kernel virtio-net
    "--enable-vhost-user",           # virtiofsd, vhost-user-vsock
    "--enable-virtfs", "--enable-attr", "--enable-cap-ng",  # 9p shares (unprivileged volumes)
    "--enable-seccomp",              # -sandbox: every pod's QEMU runs under its syscall filter (docs/security.md)
    "--enable-malloc-trim",          # QEMU gives freed heap back (its RCU thread, and x-kvmpod-tb-flush): an auto
                                     # feature, so --without-default-features had turned it off
    "--disable-docs", "--disable-user", "--audio-drv-list=",
)

# configs/devices/x86_64-softmmu/kvmpod.mak. CONFIG_PCI_DEVICES=n drops the default PCI device set
# (NICs, sound, USB controllers...); the boards select what they cannot work without.
DEVICES = """\
CONFIG_PCI_DEVICES=n
# microvm for the minimal kernel; pc (i440fx) for the distro kernel, which needs PCI
CONFIG_MICROVM=y
CONFIG_I440FX=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_SERIAL=y
CONFIG_VIRTIO_NET=y
CONFIG_VIRTIO_RNG=y
CONFIG_VIRTIO_9P=y
CONFIG_VHOST_USER_FS=y
CONFIG_VHOST_USER_VSOCK=y
CONFIG_VHOST_VSOCK=y
CONFIG_PVPANIC_ISA=y
CONFIG_PVPANIC_PCI=y
"""

REQUIRED_MACHINES = ("microvm", "pc")
REQUIRED_DEVICES = tuple(f"{device}-{bus}" for device in (
    "virtio-blk", "virtio-serial", "virtio-net", "virtio-rng", "virtio-9p", "vhost-user-fs", "vhost-user-vsock",
    "vhost-vsock") for bus in ("device", "pci")) + ("virtserialport", "pvpanic", "pvpanic-pci")


def read_patches(patch_dir: Path = PATCH_DIR) -> list[tuple[str, bytes]]:
    """kvmpod's QEMU patches: (name, contents), in the order they are applied."""
    try:
        return [(p.name, p.read_bytes()) for p in kcache.find_patches(patch_dir)]
    except OSError as e:
        raise QemuBuildError(f"cannot read kvmpod's QEMU patches in {patch_dir}: {e.strerror}") from e


def build_hash(source_version: str, features: tuple[str, ...] = FEATURES, devices: str = DEVICES,
               patches: list[tuple[str, bytes]] | None = None) -> str:
    """sha256 over everything that decides the binary (`patches`: read_patches() when None)."""
    h = hashlib.sha256()

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for text in (f"kvmpod-qemu/{RECIPE_VERSION}", source_version, "\0".join(features), devices):
        part(text.encode())
    for name, data in read_patches() if patches is None else patches:
        part(name.encode())
        part(data)
    return h.hexdigest()


def source_version(package: str = BINARY_PACKAGE) -> str:
    """The source version of the installed qemu-system-x86 (its binNMU suffix dropped)."""
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${source:Version}", package],
                              capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
    except FileNotFoundError as e:
        raise QemuBuildError("dpkg-query not found: kvmpod's QEMU is built from Debian's qemu source package") from e
    status, _, version = proc.stdout.partition("\t")
    if proc.returncode != 0 or not status.endswith(" installed") or not version:
        raise QemuBuildError(f"the Debian package {package} is not installed: apt-get install {package}")
    return version


def dir_name(version: str, digest: str) -> str:
    upstream = re.sub(r"^\d+:", "", version)  # no epoch colon in a path
    return f"{DIR_PREFIX}{upstream}-{digest[:8]}"


def installed_build(root: Path, digest: str) -> Path | None:
    """The cache entry built from exactly these inputs, if it is there and complete."""
    for entry in sorted(root.glob(f"{DIR_PREFIX}*-{digest[:8]}")):
        meta = read_build_meta(entry)
        if meta and meta.get("build_sha256") == digest and (entry / QEMU_NAME).is_file():
            return entry
    return None


def deb_src_sources(text: str, deb822: bool) -> str:
    """The host's apt sources as deb-src entries (same mirrors, suites, components and keys)."""
    if deb822:
        return re.sub(r"(?mi)^Types:.*$", "Types: deb-src", text)
    lines = []
    for line in text.splitlines():
        if re.match(r"\s*deb\s", line):
            lines.append(re.sub(r"^\s*deb\s", "deb-src ", line))
    return "\n".join(lines) + "\n"


def _apt_options(apt_dir: Path) -> list[str]:
    return ["-o", f"Dir::Etc::SourceList={apt_dir / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={apt_dir / 'sources.list.d'}",
            "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
            "-o", f"Dir::Cache={apt_dir / 'cache'}",
            "-o", "APT::Sandbox::User=root" if os.geteuid() == 0 else "Debug::NoLocking=1",
            "-q"]


def _write_apt_sources(apt_dir: Path, etc_apt: Path = Path("/etc/apt")) -> None:
    parts = apt_dir / "sources.list.d"
    for sub in (parts, apt_dir / "lists" / "partial", apt_dir / "cache" / "archives" / "partial"):
        sub.mkdir(parents=True, exist_ok=True)
    for old in parts.iterdir():
        old.unlink()
    main = etc_apt / "sources.list"
    (apt_dir / "sources.list").write_text(deb_src_sources(main.read_text(), deb822=False) if main.is_file() else "")
    for source in sorted((etc_apt / "sources.list.d").glob("*")):
        if source.suffix == ".sources":
            (parts / source.name).write_text(deb_src_sources(source.read_text(), deb822=True))
        elif source.suffix == ".list":
            (parts / source.name).write_text(deb_src_sources(source.read_text(), deb822=False))


def _fetch_source(work: Path, version: str, log: Callable[[str], None], patch_dir: Path = PATCH_DIR) -> Path:
    """Debian's source package of `version`, unpacked with Debian's patches and then kvmpod's; returns
    the source tree. A kept tree is reused only if it was made with the same version and patches."""
    src = work / "src"
    stamp = src / ".kvmpod-unpacked"
    patches = kcache.find_patches(patch_dir)
    wanted = build_hash(version, features=(), devices="", patches=read_patches(patch_dir))
    if stamp.is_file() and stamp.read_text() == wanted:
        return src
    apt_dir, download = work / "apt", work / "download"
    _write_apt_sources(apt_dir)
    options = _apt_options(apt_dir)
    log(f"fetching Debian's {SOURCE_PACKAGE} {version} source")
    kcache.run_tool(["apt-get", *options, "update"], error=QemuBuildError)
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    kcache.run_tool(["apt-get", *options, "source", "--download-only", f"{SOURCE_PACKAGE}={version}"], cwd=download,
                    error=QemuBuildError)
    dscs = sorted(download.glob("*.dsc"))
    if len(dscs) != 1:
        raise QemuBuildError(f"apt-get source left {len(dscs)} .dsc files in {download}, expected 1")
    dsc = dscs[0]
    shutil.rmtree(src, ignore_errors=True)
    log(f"unpacking {dsc.name} with Debian's patches")
    # --no-check: the maintainer's signature needs debian-keyring; apt already checked every file
    # against the archive's signed index.
    kcache.run_tool(["dpkg-source", "--no-check", "-x", str(dsc), str(src)], error=QemuBuildError)
    shutil.rmtree(download, ignore_errors=True)
    kcache.apply_patches(src, patches, log, error=QemuBuildError)
    stamp.write_text(wanted)
    return src


def configure_argv(src: Path, version: str) -> list[str]:
    return [str(src / "configure"), "--target-list=x86_64-softmmu", "--without-default-features",
            "--without-default-devices", "--with-devices-x86_64=kvmpod", "--with-git-submodules=ignore",
            f"--with-pkgversion=kvmpod {version}",
            # Debian's firmware (qboot, linuxboot_dma.bin, SeaBIOS) from qemu-system-data and seabios
            "--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu", *FEATURES]


def _build_binary(src: Path, out: Path, version: str, digest: str, jobs: int, log: Callable[[str], None]) -> Path:
    (src / "configs/devices/x86_64-softmmu/kvmpod.mak").write_text(DEVICES)
    stamp = out / ".kvmpod-configured"
    if not (stamp.is_file() and stamp.read_text() == digest):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        log("configuring QEMU")
        kcache.run_tool(configure_argv(src, version), cwd=out, error=QemuBuildError)
        stamp.write_text(digest)
    log_path = out / "build.log"
    log(f"building {QEMU_NAME} (make -j{jobs}; ~2 min on 2 cores, log in {log_path})")
    started = time.monotonic()
    with open(log_path, "w") as build_log:
        proc = subprocess.run(["make", f"-j{jobs}", QEMU_NAME], cwd=out, stdout=build_log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, LC_ALL="C"))
    if proc.returncode != 0:
        raise QemuBuildError(f"`make {QEMU_NAME}` failed (exit {proc.returncode}): "
                             f"{kcache.tail(log_path.read_text(errors='replace'))} (full log: {log_path})")
    log(f"built in {time.monotonic() - started:.0f} s")
    return out / QEMU_NAME


def _help_names(binary: Path, option: str) -> set[str]:
    text = kcache.run_tool([str(binary), option, "help"], error=QemuBuildError)
    names = set(re.findall(r'^name "([^"]+)"', text, re.M))   # -device help
    names |= {line.split()[0] for line in text.splitlines()[1:] if line.strip()}  # -machine help
    return names


def missing_capabilities(binary: Path) -> list[str]:
    """What kvmpod may ask for that `binary` lacks (empty: all there)."""
    machines = _help_names(binary, "-machine")
    devices = _help_names(binary, "-device")
    return ([f"machine {m}" for m in REQUIRED_MACHINES if m not in machines]
            + [f"device {d}" for d in REQUIRED_DEVICES if d not in devices])


def _remove_older(root: Path, keep: Path, log: Callable[[str], None]) -> None:
    for entry in root.glob(f"{DIR_PREFIX}*"):
        if entry != keep and entry.is_dir():
            log(f"removing the older build {entry}")
            shutil.rmtree(entry, ignore_errors=True)


def _install(binary: Path, root: Path, version: str, digest: str) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        stage = scratch / "stage"
        stage.mkdir()
        kcache.run_tool(["strip", "-o", str(stage / QEMU_NAME), str(binary)], error=QemuBuildError)
        if missing := missing_capabilities(stage / QEMU_NAME):
            raise QemuBuildError(f"the built {binary} lacks {', '.join(missing)}: see DEVICES in {__file__}")
        meta = {"source_package": SOURCE_PACKAGE, "source_version": version, "build_sha256": digest,
                "recipe": RECIPE_VERSION, "features": list(FEATURES), "devices": DEVICES.splitlines(),
                "patches": [name for name, _ in read_patches()],
                "debian_binary": binary_identity(DEBIAN_QEMU)}
        tmp = stage / f".{BUILD_JSON}.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.rename(stage / BUILD_JSON)
        stage.chmod(0o755)
        final = root / dir_name(version, digest)
        kcache.replace_dir(stage, final, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _refresh_identity(entry: Path) -> None:
    """Debian's binary was reinstalled (same version, new mtime): record it, nothing to rebuild."""
    meta = read_build_meta(entry) or {}
    meta["debian_binary"] = binary_identity(DEBIAN_QEMU)
    tmp = entry / f".{BUILD_JSON}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.rename(entry / BUILD_JSON)


def build(cache: Path | None = None, force: bool = False, jobs: int | None = None, keep_source: bool = False,
          log: Callable[[str], None] = lambda msg: print(msg, flush=True)) -> Path:
    """Build kvmpod's QEMU into the cache unless an identical build is there; return its dir."""
    version = source_version()
    digest = build_hash(version)
    root = qemu_dir(cache)
    jobs = jobs or len(os.sched_getaffinity(0))
    with kcache.locked(root, log, what="QEMU build", error=QemuBuildError):
        if not force and (done := installed_build(root, digest)):
            if (read_build_meta(done) or {}).get("debian_binary") != binary_identity(DEBIAN_QEMU):
                _refresh_identity(done)
            log(f"kvmpod's QEMU is up to date in {done}")
            return done
        work = (cache or paths.cache_dir()) / "build" / f"qemu-{re.sub(r'^[0-9]+:', '', version)}"
        try:
            work.parent.mkdir(parents=True, exist_ok=True)
            for stale in work.parent.glob("qemu-*"):  # other source versions
                if stale != work:
                    shutil.rmtree(stale, ignore_errors=True)
            work.mkdir(exist_ok=True)
            src = _fetch_source(work, version, log)
            binary = _build_binary(src, work / "out", version, digest, jobs, log)
            final = _install(binary, root, version, digest)
            # make's output outlives the build tree, next to the binary it made (`kvmpod setup` names it)
            shutil.copyfile(work / "out" / "build.log", final / BUILD_LOG)
            _remove_older(root, final, log)
            if not keep_source:
                shutil.rmtree(work, ignore_errors=True)
        except OSError as e:
            raise QemuBuildError(f"cannot build QEMU in {work}: {e}") from e
    size = (final / QEMU_NAME).stat().st_size
    log(f"kvmpod's QEMU ({version}) installed in {final} ({size / 1e6:.1f} MB)")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmpod.vm.qemu_build",
                                     description="Build kvmpod's own QEMU from Debian's qemu source package.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build and install QEMU into the cache (nothing if up to date)")
    kcache.add_build_arguments(p, "the QEMU binary", "qemu", "and build tree, ~600 MB")
    sub.add_parser("deps", help="print the Debian packages the build needs")
    args = parser.parse_args(argv)

    def action() -> None:
        if args.command == "build":
            build(args.cache, force=args.force, jobs=args.jobs, keep_source=args.keep_source)
        else:
            print(" ".join(BUILD_PACKAGES))

    return kcache.run_command_line(action)


if __name__ == "__main__":
    sys.exit(main())
