"""Build kvmpod's minimal guest kernel: `python -m kvmpod.boot.minimal build`.

The kernel is Debian's ``linux-source-6.1`` configured as ``make tinyconfig`` plus the fragment
``kvmpod/boot/data/minimal.config`` (everything built in, no modules), with the patches in
``kvmpod/boot/data/patches/*.patch`` (data files of the package: an installed kvmpod builds the same
kernel as a checkout):

1. the source tarball (/usr/src/linux-source-6.1.tar.xz) is unpacked into
   ``cache_dir()/build/linux-<package version>/src`` and patched; the build output goes to
   ``.../out`` (``make O=``, ~190 MB, kept so that a changed fragment rebuilds incrementally);
   the source tree (~1.3 GB) is deleted after a successful build unless ``--keep-source``
   (unpacking it again takes ~10 s and keeps the file times, so ``out`` stays valid);
2. ``make tinyconfig``, ``scripts/kconfig/merge_config.sh -m`` with the fragment,
   ``make olddefconfig``; then every option of the fragment must have survived exactly
   (``=y``/value, ``is not set``), or the build stops with a KernelError naming the dropped ones;
3. ``make vmlinux bzImage``; vmlinux must carry the PVH entry note (microvm boots it directly);
4. vmlinux, bzImage and the .config are installed atomically (staging dir + rename, under the
   kernel cache lock shared with the distro fetcher) as
   ``cache_dir()/kernels/minimal-<kernelrelease>-<hash8>/`` with kernel.json.

The hash (``fragment_sha256`` in kernel.json) covers the fragment, the linux-source package
version, the patches and RECIPE_VERSION: when none of them changed, `build` does nothing (under
a second). Older minimal kernels built by this module are removed when a new one is installed.

``host_tsc_khz()`` (kvmpod/boot/tsc.py) gives the host's TSC frequency for the guest's
``tsc_early_khz=``; `main` prints it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvmpod import paths
from kvmpod.boot import kcache
from kvmpod.boot.tsc import host_tsc_khz
from kvmpod.errors import KernelError

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
DATA_DIR = Path(__file__).resolve().parent / "data"
FRAGMENT = DATA_DIR / "minimal.config"
PATCH_DIR = DATA_DIR / "patches"
DIR_PREFIX = "minimal-"
# Bump when the build steps change what comes out for the same fragment, source and patches.
RECIPE_VERSION = 1
# What the build needs besides the source package (for `make deps`): compiler and libc headers
# (build-essential), the kconfig parser generators, bc (timeconst.h), libelf (objtool), xz (the
# tarball), patch.
BUILD_PACKAGES = ("linux-source-6.1", "build-essential", "flex", "bison", "bc", "libelf-dev", "xz-utils",
                  "patch")
# The APIC timer frequency of QEMU's emulated local APIC (1 GHz bus); for `lapic_timer_khz=`,
# which data/patches/0001-x86-apic-lapic_timer_khz-boot-option.patch adds.
QEMU_LAPIC_TIMER_KHZ = 1_000_000

# Reproducible build stamps (uname -v): the same inputs give the same kernel.
_KBUILD_VARS = ("KBUILD_BUILD_USER=kvmpod", "KBUILD_BUILD_HOST=kvmpod",
                "KBUILD_BUILD_TIMESTAMP=1970-01-01")


# --- the fragment ----------------------------------------------------------------------------

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^#\s*(CONFIG_[A-Za-z0-9_]+) is not set\s*$")


def parse_fragment(text: str, name: str = "fragment") -> dict[str, str | None]:
    """The options of a config fragment: {"CONFIG_X": "y" | value as written | None (not set)}.

    `CONFIG_X=n` counts as not set. Other `#` lines and blank lines are comments; anything
    else, and an option given twice, is a KernelError naming the line.
    """
    options: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if m := _SET.match(line):
            option, value = m.group(1), m.group(2)
            value = None if value == "n" else value
        elif m := _UNSET.match(line):
            option, value = m.group(1), None
        elif not line or line.startswith("#"):
            continue
        else:
            raise KernelError(f"{name} line {number}: not a kernel config line: {line!r}")
        if option in options:
            raise KernelError(f"{name} line {number}: {option} is set twice")
        options[option] = value
    return options


def parse_dotconfig(text: str) -> dict[str, str]:
    """The set options of a .config, values exactly as written (strings keep their quotes)."""
    return {m.group(1): m.group(2) for m in map(_SET.match, map(str.strip, text.splitlines()))
            if m and m.group(2) != "n"}


def dropped_options(wanted: dict[str, str | None], config_text: str) -> list[str]:
    """The fragment options the final .config does not honour, as "CONFIG_X=y (got: ...)"."""
    have = parse_dotconfig(config_text)
    dropped = []
    for option, value in wanted.items():
        got = have.get(option)
        if got == value:
            continue
        want = f"{option}={value}" if value is not None else f"{option} unset"
        dropped.append(f"{want} (got: {got if got is not None else 'not set'})")
    return dropped


def verify_config(wanted: dict[str, str | None], config_text: str, name: str = "the fragment") -> None:
    """KernelError listing every option of `wanted` that the .config dropped or changed."""
    dropped = dropped_options(wanted, config_text)
    if dropped:
        raise KernelError(f"make olddefconfig dropped {len(dropped)} option(s) of {name} "
                          f"(missing dependency or typo?): {'; '.join(dropped)}")


# --- what gets built: the hash ---------------------------------------------------------------

def build_hash(fragment: bytes, source_version: str, patches: list[tuple[str, bytes]]) -> str:
    """sha256 over everything that decides the kernel: recipe version, source package version,
    fragment, and the patches (names and contents, in order)."""
    h = hashlib.sha256()

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    part(f"kvmpod-minimal-kernel/{RECIPE_VERSION}".encode())
    part(source_version.encode())
    part(fragment)
    for name, data in patches:
        part(name.encode())
        part(data)
    return h.hexdigest()


def source_version(package: str = SOURCE_PACKAGE) -> str:
    """The installed version of the linux-source package (KernelError if it is not installed)."""
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                              capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
    except FileNotFoundError as e:
        raise KernelError("dpkg-query not found: the minimal kernel is built from Debian's "
                          f"{package} package") from e
    status, _, version = proc.stdout.partition("\t")
    if proc.returncode != 0 or not status.endswith(" installed") or not version:
        raise KernelError(f"the Debian package {package} is not installed: "
                          f"apt-get install {' '.join(BUILD_PACKAGES)}")
    return version


def _meta(kdir: Path) -> dict[str, object] | None:
    try:
        meta = json.loads((kdir / kcache.KERNEL_JSON).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def installed_kernel(kdir_root: Path, digest: str) -> Path | None:
    """The cache entry built from exactly these inputs, if it is there and complete."""
    for entry in sorted(kdir_root.glob(f"{DIR_PREFIX}*-{digest[:8]}")):
        meta = _meta(entry)
        if (meta and meta.get("kind") == "minimal" and meta.get("fragment_sha256") == digest
                and all((entry / str(meta.get(key) or "")).is_file() for key in ("image", "bzimage", "config"))):
            return entry
    return None


def dir_name(release: str, digest: str) -> str:
    return f"{DIR_PREFIX}{release}-{digest[:8]}"


# --- the vmlinux PVH note ----------------------------------------------------------------------

XEN_ELFNOTE_PHYS32_ENTRY = 18


def has_pvh_note(vmlinux: Path) -> bool:
    """True if the ELF vmlinux has the Xen PHYS32_ENTRY note, i.e. QEMU can boot it via PVH."""
    try:
        with open(vmlinux, "rb") as f:
            ehdr = f.read(64)
            if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
                return False  # not a little-endian ELF64
            phoff, = struct.unpack_from("<Q", ehdr, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
                if p_type != 4:  # PT_NOTE
                    continue
                f.seek(p_offset)
                notes, pos = f.read(p_filesz), 0
                while pos + 12 <= len(notes):
                    namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                    name = notes[pos + 12:pos + 12 + namesz].rstrip(b"\0")
                    if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                        return True
                    pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    except (OSError, struct.error):
        return False
    return False


# --- host TSC frequency ------------------------------------------------------------------------

# --- the build ---------------------------------------------------------------------------------

def build_dir(cache: Path | None = None) -> Path:
    return (cache or paths.cache_dir()) / "build"


def _make(src: Path, out: Path, targets: list[str], log_path: Path | None = None, jobs: int = 1) -> str:
    """Run make in src with O=out; with log_path, output goes to that file (errors name it)."""
    cmd = ["make", "-s", f"-j{jobs}", f"O={out}", *_KBUILD_VARS, *targets]
    if log_path is None:
        return kcache.run_tool(cmd, cwd=src)
    env = dict(os.environ, LC_ALL="C", LANG="C")
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT)
        except FileNotFoundError as e:
            raise KernelError("make not found: install the Debian package build-essential") from e
    if proc.returncode != 0:
        text = log_path.read_text(errors="replace")
        errors = [line for line in text.splitlines() if "error" in line.lower()]
        detail = kcache.tail("\n".join(errors[:3])) if errors else kcache.tail(text)
        raise KernelError(f"`make {' '.join(targets)}` failed (exit {proc.returncode}): {detail} "
                          f"(full log: {log_path})")
    return ""


def _unpack(tarball: Path, src: Path, patches: list[Path], stamp: str, log: Callable[[str], None]) -> None:
    """Unpack the source into src (replacing an old or partial one) and apply the patches."""
    stamp_file = src / ".kvmpod-unpacked"
    try:
        if stamp_file.read_text() == stamp:
            return
    except OSError:
        pass
    if not tarball.is_file():
        raise KernelError(f"kernel source {tarball} not found: install the Debian package {SOURCE_PACKAGE}")
    shutil.rmtree(src, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=src.parent))
    try:
        log(f"unpacking {tarball}")
        kcache.run_tool(["tar", "-xf", str(tarball), "-C", str(tmp)])
        tops = [d for d in tmp.iterdir() if d.is_dir()]
        if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
            raise KernelError(f"{tarball} does not hold one kernel source tree")
        tops[0].rename(src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kcache.apply_patches(src, patches, log)
    stamp_file.write_text(stamp)


def _configure(src: Path, out: Path, fragment_path: Path, wanted: dict[str, str | None]) -> str:
    """tinyconfig + fragment + olddefconfig in out; returns the verified .config text."""
    out.mkdir(parents=True, exist_ok=True)
    _make(src, out, ["tinyconfig"])
    kcache.run_tool([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(out), str(out / ".config"),
          str(fragment_path)], cwd=src)
    _make(src, out, ["olddefconfig"])
    text = (out / ".config").read_text()
    verify_config(wanted, text, str(fragment_path))
    return text


def _remove_older(kdir_root: Path, keep: Path, log: Callable[[str], None]) -> None:
    """Delete the other minimal kernels built by this module (kernel.json with fragment_sha256)."""
    for entry in kdir_root.glob(f"{DIR_PREFIX}*"):
        meta = _meta(entry)
        if entry != keep and meta and meta.get("kind") == "minimal" and "fragment_sha256" in meta:
            log(f"removing the older minimal kernel {entry}")
            shutil.rmtree(entry, ignore_errors=True)


def current_digest(fragment_path: Path = FRAGMENT, patch_dir: Path = PATCH_DIR) -> str:
    """The build hash of what `build` would build now (KernelError if linux-source is not installed)."""
    try:
        fragment = fragment_path.read_bytes()
    except OSError as e:
        raise KernelError(f"cannot read the kernel config fragment {fragment_path}: {e.strerror}") from e
    return build_hash(fragment, source_version(), [(p.name, p.read_bytes()) for p in kcache.find_patches(patch_dir)])


def build(cache: Path | None = None, fragment_path: Path = FRAGMENT, patch_dir: Path = PATCH_DIR,
          tarball: Path = SOURCE_TARBALL, force: bool = False, jobs: int | None = None,
          keep_source: bool = False, log: Callable[[str], None] = lambda msg: print(msg, flush=True)) -> Path:
    """Build the minimal kernel into the cache unless an identical one is there; return its dir."""
    try:
        fragment = fragment_path.read_bytes()
    except OSError as e:
        raise KernelError(f"cannot read the kernel config fragment {fragment_path}: {e.strerror}") from e
    wanted = parse_fragment(fragment.decode("utf-8", "replace"), str(fragment_path))
    patches = kcache.find_patches(patch_dir)
    patch_data = [(p.name, p.read_bytes()) for p in patches]
    version = source_version()
    digest = build_hash(fragment, version, patch_data)
    kdir_root = kcache.kernels_dir(cache)
    if not force and (done := installed_kernel(kdir_root, digest)):
        log(f"minimal kernel is up to date in {done}")
        return done
    jobs = jobs or len(os.sched_getaffinity(0))
    with kcache.locked(kdir_root, log):
        if not force and (done := installed_kernel(kdir_root, digest)):
            log(f"minimal kernel is up to date in {done}")
            return done
        root = build_dir(cache)
        work = root / f"linux-{version}"
        src, out = work / "src", work / "out"
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("linux-*"):  # other source versions, crashed unpacks
                if stale != work:
                    shutil.rmtree(stale, ignore_errors=True)
            work.mkdir(exist_ok=True)
            for stale in work.glob(".unpack-*"):
                shutil.rmtree(stale, ignore_errors=True)
            patch_stamp = build_hash(b"", version, patch_data)
            _unpack(tarball, src, patches, patch_stamp, log)
            # A different patch set means different sources: start the output over.
            out_stamp = out / ".kvmpod-patches"
            if out.exists() and (not out_stamp.is_file() or out_stamp.read_text() != patch_stamp):
                shutil.rmtree(out)
            config_text = _configure(src, out, fragment_path, wanted)
            out_stamp.write_text(patch_stamp)
            log(f"building linux {version} with {fragment_path.name} (make -j{jobs}; ~5 min on 2 cores, "
                f"log in {work / 'build.log'})")
            started = time.monotonic()
            _make(src, out, ["vmlinux", "bzImage"], log_path=work / "build.log", jobs=jobs)
            release = _make(src, out, ["kernelrelease"]).strip()
            log(f"built {release} in {time.monotonic() - started:.0f} s")
            vmlinux, bzimage = out / "vmlinux", out / "arch/x86/boot/bzImage"
            if not has_pvh_note(vmlinux):
                raise KernelError(f"{vmlinux} has no PVH entry note: is CONFIG_PVH in {fragment_path}?")

            scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=kdir_root))
            try:
                stage = scratch / "stage"
                stage.mkdir()
                shutil.copyfile(vmlinux, stage / "vmlinux")
                shutil.copyfile(bzimage, stage / "bzImage")
                (stage / "config").write_text(config_text)
                meta = {
                    "kind": "minimal",
                    "version": release,
                    "image": "vmlinux",
                    "bzimage": "bzImage",
                    "config": "config",
                    "modules": None,
                    "fragment_sha256": digest,
                    "source_package": SOURCE_PACKAGE,
                    "source_version": version,
                    "patches": [name for name, _ in patch_data],
                    "recipe": RECIPE_VERSION,
                }
                tmp = stage / f".{kcache.KERNEL_JSON}.tmp"
                tmp.write_text(json.dumps(meta, indent=2) + "\n")
                tmp.rename(stage / kcache.KERNEL_JSON)
                stage.chmod(0o755)
                final = kdir_root / dir_name(release, digest)
                kcache.replace_dir(stage, final, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            _remove_older(kdir_root, final, log)
            if not keep_source:
                shutil.rmtree(src, ignore_errors=True)
        except OSError as e:
            raise KernelError(f"cannot build the minimal kernel in {work}: {e}") from e
    size = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
    log(f"minimal kernel {release} installed in {final} ({size / 1e6:.1f} MB)")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmpod.boot.minimal",
                                     description="Build kvmpod's minimal guest kernel from Debian's linux-source.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build and install the kernel into the cache (nothing if up to date)")
    kcache.add_build_arguments(p, "the kernel", "kernels", "~1.3 GB")
    p.add_argument("--fragment", type=Path, default=FRAGMENT, help=f"config fragment (default {FRAGMENT})")
    sub.add_parser("deps", help="print the Debian packages the build needs")
    sub.add_parser("tsc-khz", help="print the host TSC frequency in kHz (for tsc_early_khz=)")
    args = parser.parse_args(argv)

    def action() -> None:
        if args.command == "build":
            build(args.cache, fragment_path=args.fragment, force=args.force, jobs=args.jobs,
                  keep_source=args.keep_source)
        elif args.command == "deps":
            print(" ".join(BUILD_PACKAGES))
        else:
            khz = host_tsc_khz()
            if khz is None:
                raise KernelError("cannot tell the host TSC frequency")
            print(khz)

    return kcache.run_command_line(action)


if __name__ == "__main__":
    sys.exit(main())
