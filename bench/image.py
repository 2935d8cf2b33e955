#!/usr/bin/env python3
"""Image benchmark: import and rootfs-disk (ISO) build throughput on a real distro rootfs, against
baselines measured in the same run on the same data, and what a cached second run costs.

The rootfs is a Debian bookworm minbase made with debootstrap, plus a few packages so that it holds
at least 200 MB of file data in at least 10,000 regular files; apt's package cache and lists are
removed and /dev is emptied (device nodes cannot go into the rootfs disk, and images ship none).
debootstrap fetches from the Debian mirror of the machine's own apt sources (bench/apt_sources.py:
/etc/apt/sources.list, sources.list.d/*.list and *.sources); it is made once and cached under <kvmpod cache dir>/bench/debian-minbase/ ($KVMPOD_CACHE_DIR, else
/var/cache/kvmpod as root), with its gzip ACI (built by kvmpod's build_aci), keyed by the rootfs.

Measured, each run in a throwaway store under /tmp (removed afterwards), medians over the runs:
  (a) first import, Store.import_aci: decompress + sha512 + manifest and hostile-entry checks
      baselines: `gzip -dc ACI | sha512sum` (the floor), `tar -xf ACI` (what unpacking costs)
  (b) ISO build, Store.rootfs_disk (written and fsynced)
      baseline: `xorriso -as mkisofs -R` of the extracted rootfs, then `sync` of the ISO
  (c) cached second run: import_aci of the unchanged file + rootfs_disk, in-process; the same
      calls `kvmpod run` makes before booting (resolve, claim, rootfs_disk) in a fresh interpreter;
      `kvmpod --dir STORE image list`. Baseline for the last two: `python3 -c pass`.
Throughput is MB/s (10^6 bytes) of uncompressed rootfs file data (each hard-linked file once).
Every timed step starts after a sync(), so that none pays for the writeback of another's files.

Usage: bench/image.py [--runs N] [--profile DIR] [--json FILE]   (prints a table; not a test, asserts nothing)
Needs root and the debootstrap package the first time (to make the rootfs), xorriso for (b)'s baseline.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apt_sources import NoMirror, debian_mirror  # noqa: E402
from common import KVMPOD, Unavailable, stats, target, timed  # noqa: E402

from kvmpod import paths  # noqa: E402

SUITE = "bookworm"
# minbase alone has ~5,300 files in ~200 MB, a quarter of it apt's caches (removed): these take it past both
# thresholds (bookworm, 2026: 256 MB in 11,252 files).
INCLUDE = ["python3", "python3-pip", "perl", "locales"]
MIN_BYTES = 200_000_000
MIN_FILES = 10_000
IMAGE_NAME = "bench/debian-minbase"
MB = 1e6

# What `kvmpod run IMAGE` does with the image before it boots (kvmpod.pod.launch.prepare_apps), in a
# fresh interpreter that has also imported what `kvmpod run` imports.
_RUN_PATH_SCRIPT = """
import sys
from pathlib import Path
import kvmpod.cli, kvmpod.pod.launch
from kvmpod.image.manifest import check_runnable
from kvmpod.store.store import Store
store = Store(Path(sys.argv[1]))
image = store.resolve(sys.argv[2])
check_runnable(image.manifest)
with store.claim([image]):
    store.rootfs_disk(image)
"""




# --- the fixture -------------------------------------------------------------------------------


def fixture_dir() -> Path:
    return paths.cache_dir() / "bench" / "debian-minbase"


def _debootstrap_argv(target: Path, mirror: str = "") -> list[str]:
    """debootstrap's command line; without `mirror`, as _fixture_spec() records it."""
    return ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, str(target),
            *([mirror] if mirror else [])]


def _fixture_spec() -> dict[str, Any]:
    """What the cached rootfs was made from: a different spec means it is made again. The mirror is not
    part of it (any mirror serves the same suite), so a cached rootfs needs no apt source to be reused."""
    return {"debootstrap": _debootstrap_argv(Path("TARGET")), "cleaned": ["var/cache/apt/archives/*.deb",
            "var/lib/apt/lists/*", "dev/*"], "version": 1}


def _same_spec(recorded: Any, spec: dict[str, Any]) -> bool:
    """Whether a rootfs.json spec is `spec`; stamps written before the mirror came from apt's sources
    have it as debootstrap's last word (dropped here: the rootfs is the same)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("debootstrap"), list):
        return False
    argv = spec["debootstrap"]
    return {**recorded, "debootstrap": recorded["debootstrap"][:len(argv)]} == spec


def count_tree(root: Path) -> dict[str, int]:
    """Regular files (each inode once) and their bytes, and all entries, of a tree; nothing followed."""
    files = data = entries = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_mode & 0o170000) == 0o100000 and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                files += 1
                data += st.st_size
    return {"files": files, "bytes": data, "entries": entries}


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def _remove_tree(path: Path) -> None:
    """rmtree, but never through a mount debootstrap may have left behind (/proc, /sys, bound /dev nodes)."""
    if not path.exists():
        return
    for point in sorted(_mounts_under(path), reverse=True):
        subprocess.run(["umount", "-l", point], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if left := _mounts_under(path):
        raise Unavailable(f"{path}: still has mounts under it ({left[0]} ...); unmount them and remove it")
    shutil.rmtree(path)


@contextmanager
def _locked(lock: Path) -> Iterator[None]:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_rootfs(base: Path) -> tuple[Path, dict[str, Any]]:
    """The cached rootfs and its description (made with debootstrap the first time)."""
    rootfs, stamp = base / "rootfs", base / "rootfs.json"
    spec = _fixture_spec()
    try:
        info = json.loads(stamp.read_text())
        if _same_spec(info.get("spec"), spec) and rootfs.is_dir():
            return rootfs, info
    except (OSError, ValueError):
        pass
    if shutil.which("debootstrap") is None:
        raise Unavailable("debootstrap is not installed (apt-get install debootstrap) and no cached rootfs at "
                          f"{rootfs}")
    if os.geteuid() != 0:
        raise Unavailable(f"making the Debian rootfs with debootstrap needs root (no cached one at {rootfs})")
    try:
        mirror = debian_mirror(SUITE)
    except NoMirror as e:
        raise Unavailable(f"no Debian mirror to make the rootfs from (no cached one at {rootfs}): {e}") from None
    base.mkdir(parents=True, exist_ok=True)
    _remove_tree(rootfs)
    stamp.unlink(missing_ok=True)
    tmp = base / "rootfs.tmp"
    _remove_tree(tmp)
    log = base / "debootstrap.log"
    argv = _debootstrap_argv(tmp, mirror)
    print(f"making the rootfs once: {' '.join(argv)} (log: {log})", flush=True)
    began = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else "(no output)"
        _remove_tree(tmp)
        raise Unavailable(f"debootstrap failed (exit {rc}): {last.strip()} (see {log})")
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "dev/*"):
        for p in tmp.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                _remove_tree(p)
            else:
                p.unlink()
    counts = count_tree(tmp)
    if counts["bytes"] < MIN_BYTES or counts["files"] < MIN_FILES:
        _remove_tree(tmp)
        raise Unavailable(f"the debootstrap rootfs has {counts['bytes'] / MB:.0f} MB in {counts['files']} files, "
                          f"under the {MIN_BYTES / MB:.0f} MB / {MIN_FILES} files wanted: add packages to INCLUDE")
    os.rename(tmp, rootfs)
    info = {"spec": spec, "mirror": mirror, "made": time.time(), "made_in_s": time.perf_counter() - began, **counts}
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return rootfs, info


def ensure_aci(base: Path, rootfs: Path, rootfs_info: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The gzip ACI of the cached rootfs (kvmpod's build_aci), made again whenever the rootfs is."""
    from kvmpod.image.build import build_aci
    from kvmpod.image.manifest import build_manifest

    aci, stamp = base / "debian-minbase.aci", base / "aci.json"
    key = hashlib.sha256(json.dumps(rootfs_info, sort_keys=True).encode()).hexdigest()
    try:
        info = json.loads(stamp.read_text())
        if info.get("rootfs_key") == key and aci.is_file() and aci.stat().st_size == info.get("size"):
            return aci, info
    except (OSError, ValueError):
        pass
    print(f"building the gzip ACI once: {aci}", flush=True)
    began = time.perf_counter()
    manifest = build_manifest(IMAGE_NAME, exec_=["/bin/true"], labels={"version": SUITE})
    build_aci(rootfs, manifest, aci, "gzip")
    info = {"rootfs_key": key, "compression": "gzip", "size": aci.stat().st_size,
            "built_in_s": time.perf_counter() - began}
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return aci, info


def ensure_fixture() -> tuple[Path, dict[str, Any]]:
    base = fixture_dir()
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(base.parent, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise Unavailable(f"{base.parent}: {e.strerror or e} (set KVMPOD_CACHE_DIR to a writable directory)") from None
    with _locked(base.parent / "debian-minbase.lock"):
        rootfs, rootfs_info = ensure_rootfs(base)
        aci, aci_info = ensure_aci(base, rootfs, rootfs_info)
    return aci, {"rootfs": str(rootfs), "aci": str(aci), "packages": f"minbase +{','.join(INCLUDE)}",
                 "suite": SUITE, "bytes": rootfs_info["bytes"], "files": rootfs_info["files"],
                 "entries": rootfs_info["entries"], "aci_bytes": aci_info["size"]}


# --- measuring ---------------------------------------------------------------------------------


def _settle() -> None:
    """Flush what earlier steps wrote or deleted, so that no step pays for another's writeback."""
    os.sync()


def _clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds `fn` takes, with stderr not a terminal (no progress bar: the same figure in a log or a tty)."""
    _settle()
    held, sys.stderr = sys.stderr, io.StringIO()
    try:
        start = time.perf_counter()
        value = fn()
        return time.perf_counter() - start, value
    finally:
        held.write(sys.stderr.getvalue())
        sys.stderr = held


def _profiled(fn: Callable[[], Any], out: Path) -> Callable[[], Any]:
    def run() -> Any:
        import cProfile

        prof = cProfile.Profile()
        try:
            return prof.runcall(fn)
        finally:
            prof.dump_stats(out)
    return run


def _unpack_dir(data_bytes: int) -> str:
    """Where the tar baseline unpacks: tmpfs if it has room. On ext4, creating files soon after many
    were deleted (every run deletes the last run's tree) goes through ext4's recently_deleted() inode
    scan, which made `tar -x` of this rootfs take 2.5 to 14 s from run to run: noise, not unpacking."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
        if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > 3 * data_bytes:
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def measure_image(runs: int, profile_dir: Path | None = None) -> dict[str, Any]:
    """Everything in the module docstring, `runs` times, interleaved so host noise hits all alike."""
    from kvmpod.store.store import Store

    aci, fixture = ensure_fixture()
    iso_tool: list[str] = []
    if xorriso := shutil.which("xorriso"):
        iso_tool = [xorriso, "-as", "mkisofs"]
    elif genisoimage := shutil.which("genisoimage") or shutil.which("mkisofs"):
        iso_tool = [genisoimage]
    iso_baseline_skipped = None if iso_tool else "neither xorriso nor genisoimage is installed (apt-get install xorriso)"
    q_aci = subprocess.list2cmdline([str(aci)])
    samples: dict[str, list[float]] = {k: [] for k in (
        "import", "iso", "floor_gzip_sha512", "tar_x", "mkisofs", "cached_import", "cached_disk",
        "cached_total", "run_path_subprocess", "image_list_subprocess", "python_pass")}
    extra: dict[str, Any] = {}
    unpack_parent = _unpack_dir(fixture["bytes"])
    extra["tar_x_into"] = unpack_parent
    with open(aci, "rb") as f:  # the compressed file in the page cache, as for every later read
        while f.read(1 << 20):
            pass
    if profile_dir is not None:  # an extra run under cProfile, not counted (the profiler slows Python ~2x)
        with tempfile.TemporaryDirectory(prefix="kvmpod-bench-image-", dir="/tmp") as tmp:
            store = Store(Path(tmp) / "store")
            image = _profiled(lambda: store.import_aci(aci), profile_dir / "import.prof")()
            _profiled(lambda: store.rootfs_disk(image), profile_dir / "iso.prof")()
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="kvmpod-bench-image-", dir="/tmp") as tmp:
            work = Path(tmp)
            # baselines
            _settle()
            samples["floor_gzip_sha512"].append(
                timed(["bash", "-o", "pipefail", "-c", f"gzip -dc {q_aci} | sha512sum"]))
            with tempfile.TemporaryDirectory(prefix="kvmpod-bench-image-", dir=unpack_parent) as tree:
                _settle()
                samples["tar_x"].append(timed(["tar", "-xf", str(aci), "-C", tree]))
                if iso_tool:
                    out_iso = work / "baseline.iso"
                    _settle()
                    samples["mkisofs"].append(timed(["sh", "-c", subprocess.list2cmdline(
                        [*iso_tool, "-quiet", "-R", "-o", str(out_iso), f"{tree}/rootfs"]) + " && sync "
                        + subprocess.list2cmdline([str(out_iso)])]))
                    extra["baseline_iso_bytes"] = out_iso.stat().st_size
                    out_iso.unlink()
            # kvmpod, first run
            root = work / "store"
            store = Store(root)
            t, image = _clock(lambda: store.import_aci(aci))
            samples["import"].append(t)
            t, disk = _clock(lambda: store.rootfs_disk(image))
            samples["iso"].append(t)
            extra["blob_bytes"] = image.blob.stat().st_size
            extra["iso_bytes"] = disk.stat().st_size
            disk_mtime = disk.stat().st_mtime_ns
            # cached second run, in-process (a new Store, as a new process would have)
            again = Store(root)
            t_import, image2 = _clock(lambda: again.import_aci(aci))
            t_disk, disk2 = _clock(lambda: again.rootfs_disk(image2))
            if image2.id != image.id or disk2 != disk:
                raise RuntimeError("the cached run did not reuse the first run's image and disk")
            samples["cached_import"].append(t_import)
            samples["cached_disk"].append(t_disk)
            samples["cached_total"].append(t_import + t_disk)
            # cached second run, fresh interpreters
            _settle()
            samples["run_path_subprocess"].append(timed([sys.executable, "-c", _RUN_PATH_SCRIPT, str(root), str(aci)]))
            samples["image_list_subprocess"].append(timed([*KVMPOD, "--dir", str(root), "image", "list"]))
            samples["python_pass"].append(timed([sys.executable, "-c", "pass"]))
            if disk.stat().st_mtime_ns != disk_mtime or len(list((root / "rootfs").iterdir())) != 1:
                raise RuntimeError("a cached run rebuilt the rootfs disk")
        print(f"  run {i + 1}/{runs}: import {samples['import'][-1]:.2f}s, ISO {samples['iso'][-1]:.2f}s", flush=True)

    med = {k: statistics.median(v) for k, v in samples.items() if v}
    data = fixture["bytes"]

    def mbps(key: str) -> float:
        return data / med[key] / MB

    result: dict[str, Any] = {
        "runs": runs, "fixture": fixture, **extra, "iso_tool": " ".join([Path(iso_tool[0]).name, *iso_tool[1:]]) if iso_tool else None,
        "iso_baseline_skipped": iso_baseline_skipped,
        "median_s": med, "stats": {k: stats(v) for k, v in samples.items() if v}, "samples_s": samples,
        "mb_per_s": {k: mbps(k) for k in ("import", "iso", "floor_gzip_sha512", "tar_x", "mkisofs") if k in med},
        "ratios": {
            "import/floor_gzip_sha512": med["import"] / med["floor_gzip_sha512"],
            "import/tar_x": med["import"] / med["tar_x"],
            "iso/mkisofs": med["iso"] / med["mkisofs"] if "mkisofs" in med else None,
            "first_run/cached_run": (med["import"] + med["iso"]) / med["cached_total"],
            "run_path_subprocess/python_pass": med["run_path_subprocess"] / med["python_pass"],
            "image_list_subprocess/python_pass": med["image_list_subprocess"] / med["python_pass"],
        },
    }
    result["targets"] = [
        target("image import throughput / gzip -dc | sha512sum's", med["floor_gzip_sha512"] / med["import"], 0.9,
               higher_is_better=True, note="ISA-L inflate; sha512 + writes in a second thread; then one pass "
               "over the tar headers (the hostile-archive checks, ~0.45 s CPU here)"),
    ]
    if "mkisofs" in med:
        result["targets"].append(target(
            f"rootfs disk throughput / {result['iso_tool']} -R's", med["mkisofs"] / med["iso"], 0.9,
            higher_is_better=True, note="after the import in the same process (its checked headers reused); "
            "the rest is pycdlib's per-entry work (~0.7 s add, ~0.4 s records), the data copy and fsync"))
    if profile_dir:
        result["profiles"] = [str(profile_dir / "import.prof"), str(profile_dir / "iso.prof")]
    return result


def print_image(r: dict[str, Any]) -> None:
    fx, med, mbps, ratio = r["fixture"], r["median_s"], r["mb_per_s"], r["ratios"]
    print(f"rootfs: Debian {fx['suite']} {fx['packages']}: {fx['bytes'] / MB:.1f} MB in {fx['files']:,} "
          f"regular files ({fx['entries']:,} entries)")
    print(f"ACI: {fx['aci_bytes'] / MB:.1f} MB gzip, {r['blob_bytes'] / MB:.1f} MB tar; "
          f"rootfs disk {r['iso_bytes'] / MB:.1f} MB")
    print(f"{r['runs']} runs, medians; MB/s = 10^6 bytes of rootfs file data per second; "
          "ratio = time / baseline's time")
    print(f"{'':44}{'s':>8}{'MB/s':>8}{'ratio':>8}")

    def row(label: str, key: str, rat: float | None = None, with_mbps: bool = True) -> None:
        rate = f"{mbps[key]:8.1f}" if with_mbps else f"{'':8}"
        print(f"{label:44}{med[key]:8.3f}{rate}{'' if rat is None else f'{rat:8.2f}'}")

    row("(a) import (Store.import_aci)", "import", ratio["import/floor_gzip_sha512"])
    row("    floor: gzip -dc | sha512sum", "floor_gzip_sha512")
    row(f"    tar -xf (unpack into {r['tar_x_into']})", "tar_x")
    print(f"{'    ratio import/tar -xf':44}{'':16}{ratio['import/tar_x']:8.2f}")
    row("(b) ISO build (Store.rootfs_disk)", "iso", ratio["iso/mkisofs"])
    if "mkisofs" in med:
        row(f"    {r['iso_tool']} -R + sync", "mkisofs")
    else:
        print(f"    ISO baseline skipped: {r['iso_baseline_skipped']}")
    print("(c) cached second run")
    for label, key in (("import_aci again (in-process)", "cached_import"),
                       ("rootfs_disk again (in-process)", "cached_disk"), ("both", "cached_total")):
        print(f"    {label:40}{med[key] * 1000:6.2f}ms")
    print(f"{'    first run / cached run':44}{'':16}{ratio['first_run/cached_run']:8.0f}")
    row("    fresh python: resolve+claim+rootfs_disk", "run_path_subprocess",
        ratio["run_path_subprocess/python_pass"], with_mbps=False)
    row("    kvmpod --dir STORE image list", "image_list_subprocess",
        ratio["image_list_subprocess/python_pass"], with_mbps=False)
    row("    baseline: python3 -c pass", "python_pass", with_mbps=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also profile an extra (uncounted) import and ISO build; write the cProfile "
                             "stats to DIR/import.prof and DIR/iso.prof")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the result as JSON")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        result = measure_image(args.runs, args.profile)
    except Unavailable as e:
        print(f"bench/image.py: cannot run: {e}", file=sys.stderr)
        return 1
    print_image(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
