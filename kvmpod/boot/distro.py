"""Fetch Debian's cloud kernel as a guest kernel: `python -m kvmpod.boot.distro fetch`.

The kernel package is downloaded and unpacked, never installed on the host:

1. the Depends of the metapackage linux-image-cloud-amd64 (`apt-cache show`) names the real
   package and its version (linux-image-6.1.0-56-cloud-amd64 6.1.192-2);
2. `apt-get download` fetches the .deb, `dpkg -x` unpacks it, `depmod -b` writes modules.dep;
3. vmlinuz, System.map, config and the guest modules (kvmpod/boot/data/guest-modules.txt plus their
   dependencies, with a modules.dep restricted to them) go into a staging directory, kernel.json
   last, and the staging directory is renamed to cache_dir()/kernels/debian-cloud-<version>.

A lock file (cache_dir()/kernels/.lock) serialises concurrent runs; if the cached kernel has the
same version and all guest modules, nothing is done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvmpod.boot import kcache
from kvmpod.boot.modules import guest_module_names, read_modules_dep, resolve_relative
from kvmpod.errors import KernelError

META_PACKAGE = "linux-image-cloud-amd64"
DIR_PREFIX = "debian-cloud-"

def _field(control: str, name: str) -> str | None:
    """A field of the first stanza of `apt-cache show` output (continuation lines joined)."""
    value = None
    for line in control.splitlines():
        if value is not None:
            if line.startswith((" ", "\t")):
                value += " " + line.strip()
                continue
            break
        if line.startswith(name + ":"):
            value = line.split(":", 1)[1].strip()
    return value


def resolve_package(meta: str = META_PACKAGE) -> tuple[str, str]:
    """(real package name, its candidate version) for a kernel metapackage.

    One `apt-cache show` of the metapackage: its Depends names the real package, pinned with
    `(= version)` in Debian. (Each apt-cache run parses all package lists, ~0.5 s here.)
    """
    control = kcache.run_tool(["apt-cache", "show", "--no-all-versions", meta])
    depends = _field(control, "Depends") or ""
    for alternative in (alt.strip() for dep in depends.split(",") for alt in dep.split("|")):
        m = re.match(r"^(linux-image-[^\s(]+)\s*(?:\(\s*=\s*([^\s)]+)\s*\))?", alternative)
        if m and m.group(1) != meta:
            name, version = m.group(1), m.group(2)
            break
    else:
        raise KernelError(f"`apt-cache show {meta}` depends on no linux-image package (Depends: {depends or 'none'})")
    if version:
        return name, version
    version = _field(kcache.run_tool(["apt-cache", "show", "--no-all-versions", name]), "Version")
    if not version:
        raise KernelError(f"`apt-cache show {name}` gives no version (run `apt-get update`)")
    return name, version


def dir_name(version: str) -> str:
    """The cache entry name: debian-cloud-6.1.0-56-cloud-amd64 (debian-<version> for other flavours)."""
    return f"{DIR_PREFIX}{version}" if "-cloud-" in version else f"debian-{version}"


def _installed(kdir: Path) -> dict[str, object] | None:
    try:
        meta = json.loads((kdir / kcache.KERNEL_JSON).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_up_to_date(kdir: Path, package: str, package_version: str, names: list[str]) -> bool:
    """True if kdir holds this package version with every guest module (or it is built in)."""
    meta = _installed(kdir)
    if not meta or meta.get("package") != package or meta.get("package_version") != package_version:
        return False
    if not (kdir / str(meta.get("image", ""))).is_file():
        return False
    try:
        resolve_relative(kdir / str(meta.get("modules", "modules")), names)
    except KernelError:
        return False  # guest-modules.txt grew since this kernel was fetched
    return True


def _module_root(root: Path) -> tuple[Path, str]:
    """The lib/modules/<version> dir of an unpacked kernel package, and that version."""
    candidates = [d for base in ("lib/modules", "usr/lib/modules") for d in sorted((root / base).glob("*"))
                  if d.is_dir() and (d / "kernel").is_dir()]
    if len(candidates) != 1:
        found = ", ".join(str(c.relative_to(root)) for c in candidates) or "none"
        raise KernelError(f"expected one lib/modules/<version> in the unpacked package {root}, found {found}")
    return candidates[0], candidates[0].name


def _depmod(root: Path, version: str) -> None:
    # depmod -b looks in <root>/lib/modules; newer packages ship /usr/lib/modules only.
    if not (root / "lib" / "modules" / version).is_dir() and not (root / "lib").exists():
        (root / "lib").symlink_to("usr/lib")
    kcache.run_tool(["depmod", "-b", str(root), version])


def install_kernel(root: Path, stage: Path, names: list[str], package: str = "", package_version: str = "") -> str:
    """Move what the guest needs from an unpacked kernel package `root` into `stage`.

    Writes vmlinuz, System.map, config, modules/ (the closure of `names`, with modules.dep and
    modules.builtin) and finally kernel.json. Runs depmod if modules.dep is missing.
    Returns the kernel version.
    """
    moddir, version = _module_root(root)
    if not (moddir / "modules.dep").is_file():
        _depmod(root, version)
    stage.mkdir(parents=True, exist_ok=True)
    for src_name, dst_name in ((f"vmlinuz-{version}", "vmlinuz"), (f"System.map-{version}", "System.map"),
                               (f"config-{version}", "config")):
        src = root / "boot" / src_name
        if not src.is_file():
            raise KernelError(f"the kernel package has no boot/{src_name} (unpacked in {root})")
        shutil.copyfile(src, stage / dst_name)

    rels = resolve_relative(moddir, names)
    out = stage / "modules"
    out.mkdir(exist_ok=True)
    wanted = set(rels)
    dep_lines = [f"{path}: {' '.join(deps)}".rstrip() + "\n"
                 for path, deps in read_modules_dep(moddir).values() if path in wanted]
    for rel in rels:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(moddir / rel, out / rel)
    (out / "modules.dep").write_text("".join(dep_lines))
    if (moddir / "modules.builtin").is_file():
        shutil.copyfile(moddir / "modules.builtin", out / "modules.builtin")

    meta = {
        "kind": "distro",
        "version": version,
        "image": "vmlinuz",
        "config": "config",
        "modules": "modules",
        "system_map": "System.map",
        "package": package,
        "package_version": package_version,
        "guest_modules": names,
    }
    tmp = stage / f".{kcache.KERNEL_JSON}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.rename(stage / kcache.KERNEL_JSON)
    return version


def _download(package: str, workdir: Path) -> Path:
    debdir = workdir / "deb"
    debdir.mkdir()
    if os.geteuid() == 0:
        # Let apt's sandbox user write there, or apt warns it downloads unsandboxed as root.
        with contextlib.suppress(KeyError, OSError):
            os.chown(debdir, pwd.getpwnam("_apt").pw_uid, -1)
    kcache.run_tool(["apt-get", "download", "-q", package], cwd=debdir)
    debs = sorted(debdir.glob("*.deb"))
    if len(debs) != 1:
        raise KernelError(f"`apt-get download {package}` left {len(debs)} .deb files in {debdir}")
    return debs[0]


class _MaybeStaleLists(KernelError):
    """The package could not be resolved or downloaded: perhaps the package lists are stale."""


def _fetch_locked(kdir_root: Path, meta: str, names: list[str], force: bool, log: Callable[[str], None]) -> Path:
    try:
        package, package_version = resolve_package(meta)
    except KernelError as e:
        raise _MaybeStaleLists(str(e)) from e
    version = package.removeprefix("linux-image-")
    final = kdir_root / dir_name(version)
    with kcache.locked(kdir_root, log):
        if not force and is_up_to_date(final, package, package_version, names):
            log(f"guest kernel {version} ({package} {package_version}) is up to date in {final}")
            return final
        # Only the lock holder creates .fetch-* dirs: any left now are from a crashed run.
        for stale in kdir_root.glob(".fetch-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=kdir_root))
        except OSError as e:
            raise KernelError(f"cannot create a work dir in {kdir_root}: {e.strerror}") from e
        try:
            os.chmod(work, 0o755)  # apt's _apt user must reach work/deb
            log(f"downloading {package} {package_version}")
            try:
                deb = _download(package, work)
            except KernelError as e:
                raise _MaybeStaleLists(str(e)) from e
            root = work / "root"
            kcache.run_tool(["dpkg", "-x", str(deb), str(root)])
            stage = work / "stage"
            version = install_kernel(root, stage, names, package, package_version)
            final = kdir_root / dir_name(version)
            stage.chmod(0o755)
            kcache.replace_dir(stage, final, work)
        except OSError as e:
            raise KernelError(f"cannot install the guest kernel in {kdir_root}: {e}") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    log(f"guest kernel {version} installed in {final} ({size / 1e6:.1f} MB)")
    return final


def fetch(cache: Path | None = None, meta: str = META_PACKAGE, force: bool = False, update: bool = False,
          log: Callable[[str], None] = lambda msg: print(msg, flush=True)) -> Path:
    """Fetch the Debian cloud kernel into the cache (if not there yet); return its directory.

    As root, a package that cannot be resolved or downloaded makes it run `apt-get update` and
    try once more (a fresh Debian install may have no or stale package lists).
    """
    kdir_root = kcache.kernels_dir(cache)
    names = guest_module_names()
    if update:
        log("refreshing package lists (apt-get update)")
        kcache.run_tool(["apt-get", "update", "-q"])
    try:
        return _fetch_locked(kdir_root, meta, names, force, log)
    except _MaybeStaleLists as e:
        if update or os.geteuid() != 0:
            raise
        log(f"{e}: refreshing package lists (apt-get update) and retrying")
    kcache.run_tool(["apt-get", "update", "-q"])
    return _fetch_locked(kdir_root, meta, names, force, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmpod.boot.distro",
                                     description="Fetch the Debian cloud kernel as kvmpod's guest kernel.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download and unpack the kernel into the cache (no host install)")
    p.add_argument("--cache", type=Path, help="cache directory (default: kvmpod's cache dir); "
                                              "the kernel goes to CACHE/kernels/")
    p.add_argument("--package", default=META_PACKAGE, help=f"kernel metapackage (default {META_PACKAGE})")
    p.add_argument("--update", action="store_true", help="run `apt-get update` first")
    p.add_argument("--force", action="store_true", help="fetch even if the cached kernel is up to date")
    args = parser.parse_args(argv)
    return kcache.run_command_line(lambda: fetch(args.cache, args.package, force=args.force, update=args.update))


if __name__ == "__main__":
    sys.exit(main())
