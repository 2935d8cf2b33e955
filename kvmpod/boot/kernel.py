"""Finding the guest kernel.

Search order (the first that gives a value wins; see docs/kernel.md):

1. the ``--kernel`` flag (``find_kernel(explicit=...)``);
2. the environment variable ``KVMPOD_KERNEL``;
3. ``kernel = "..."`` in the config files of ``paths.config_files()`` (later files win);
4. the kernel cache ``cache_dir()/kernels/*/kernel.json`` (for non-root users also
   /var/cache/kvmpod/kernels, where root's ``kvmpod setup`` puts them, unless KVMPOD_CACHE_DIR is
   set): kind "minimal" before "distro" before "custom", then the highest version.

A value from 1-3 may be a kernel directory (holding kernel.json), a kernel.json file, a kernel
image file (bzImage/vmlinuz; its config is looked for next to it as ``config`` or
``config-<version>``; kind "custom", no modules), or the name of a cache entry
(``debian-cloud-6.1.0-56-cloud-amd64``) or a kind (``minimal``, ``distro``) in the cache.

kernel.json (all paths relative to its directory)::

    {"kind": "distro", "version": "6.1.0-56-cloud-amd64",
     "image": "vmlinuz", "config": "config", "modules": "modules"}

``config`` and ``modules`` may be null or absent (no config known; everything built in).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from kvmpod.boot.kcache import KERNEL_JSON, kernels_dir
from kvmpod.config import lookup as config_lookup
from kvmpod.errors import KernelError

KINDS = ("distro", "minimal", "custom")
# Preference among cached kernels: the minimal kernel boots 3-5x faster under TCG.
_KIND_RANK = {"minimal": 0, "distro": 1, "custom": 2}
ENV_VAR = "KVMPOD_KERNEL"


@dataclass(frozen=True)
class GuestKernel:
    image: Path                 # bzImage/vmlinuz (or a PVH vmlinux later)
    version: str                # "" if unknown
    kind: str                   # "distro" | "minimal" | "custom"
    config: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    modules_dir: Path | None = None  # dir with modules.dep and kernel/...; None: all built in

    def option(self, name: str) -> str | None:
        """The value of a kernel config option ("y", "m", a string or number), None if unset.

        The CONFIG_ prefix is optional: option("VIRTIO_PCI") == option("CONFIG_VIRTIO_PCI").
        """
        if not name.startswith("CONFIG_"):
            name = "CONFIG_" + name
        return self.config.get(name)


# --- kernel config -------------------------------------------------------------------------

_CONFIG_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")


def parse_kernel_config(text: str) -> dict[str, str]:
    """Parse a kernel .config: {"CONFIG_X": "y"|"m"|value}; string values are unquoted."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        m = _CONFIG_LINE.match(line.strip())
        if not m:
            continue  # comments, including "# CONFIG_X is not set"
        value = m.group(2)
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        options[m.group(1)] = value
    return options


class KernelConfig(Mapping[str, str]):
    """A kernel .config's options, read and parsed on first use. Finding the kernel reads every cached
    kernel's description, and only the chosen one's options are looked at: parsing the distro kernel's
    ~2,800 options on every `kvmpod run` cost ~2 ms before QEMU could be spawned (docs/performance.md)."""

    def __init__(self, path: Path):
        self.path = path
        self._options: Mapping[str, str] | None = None

    def _load(self) -> Mapping[str, str]:
        if self._options is None:
            try:
                text = self.path.read_text(errors="replace")
            except OSError as e:
                raise KernelError(f"cannot read kernel config {self.path}: {e.strerror}") from e
            self._options = MappingProxyType(parse_kernel_config(text))
        return self._options

    def __getitem__(self, name: str) -> str:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __repr__(self) -> str:
        return f"KernelConfig({str(self.path)!r})"


def load_kernel_config(path: Path) -> Mapping[str, str]:
    """The options of the .config at `path`, parsed when first used; a file that is not there (or not
    readable) is a KernelError now, so a broken cache entry is skipped as before."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        raise KernelError(f"cannot read kernel config {path}: {e.strerror}") from e
    return KernelConfig(path)


# --- kernel images -------------------------------------------------------------------------

def image_version(image: Path) -> str:
    """The release (uname -r) embedded in a bzImage's setup header, "" if not a bzImage."""
    try:
        with open(image, "rb") as f:
            head = f.read(0x8000)
    except OSError:
        return ""
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return ""
    offset = int.from_bytes(head[0x20E:0x210], "little")
    if not offset:
        return ""
    start = offset + 0x200
    end = head.find(b"\0", start)
    if start >= len(head) or end < 0:
        return ""
    return head[start:end].decode("ascii", "replace").split(" ", 1)[0]


def _version_from_name(image: Path) -> str:
    m = re.match(r"^(?:vmlinuz|vmlinux|bzImage)-(.+)$", image.name)
    return m.group(1) if m else ""


def _from_image(image: Path) -> GuestKernel:
    version = _version_from_name(image) or image_version(image)
    config: Mapping[str, str] = MappingProxyType({})
    candidates = [image.parent / "config"]
    if version:
        candidates.append(image.parent / f"config-{version}")
    for candidate in candidates:
        if candidate.is_file():
            config = load_kernel_config(candidate)
            break
    return GuestKernel(image=image, version=version, kind="custom", config=config, modules_dir=None)


def load_kernel_json(path: Path) -> GuestKernel:
    """Read a kernel.json (or the kernel.json in a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / KERNEL_JSON
    base = path.parent
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as cause:
        raise KernelError(f"no kernel.json in {base}") from cause
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KernelError(f"unreadable kernel description {path}: {e}") from e
    if not isinstance(meta, dict):
        raise KernelError(f"unreadable kernel description {path}: not a JSON object")
    kind = meta.get("kind", "custom")
    if kind not in KINDS:
        raise KernelError(f"unknown kernel kind {kind!r} in {path} (expected one of {', '.join(KINDS)})")
    image_name = meta.get("image")
    if not isinstance(image_name, str) or not image_name:
        raise KernelError(f"no \"image\" in {path}")
    image = base / image_name
    if not image.is_file():
        raise KernelError(f"kernel image {image} named in {path} does not exist")
    version = meta.get("version") or ""
    if not isinstance(version, str):
        raise KernelError(f"\"version\" in {path} is not a string")
    config: Mapping[str, str] = MappingProxyType({})
    if isinstance(meta.get("config"), str) and meta["config"]:
        config = load_kernel_config(base / meta["config"])
    modules_dir = None
    if isinstance(meta.get("modules"), str) and meta["modules"]:
        modules_dir = base / meta["modules"]
        if not (modules_dir / "modules.dep").is_file():
            raise KernelError(f"no modules.dep in {modules_dir} named in {path}")
    return GuestKernel(image=image, version=version, kind=kind, config=config, modules_dir=modules_dir)


# --- the cache -----------------------------------------------------------------------------

# Where `kvmpod setup` run as root puts kernels; other users look there after their own cache.
SYSTEM_KERNELS = Path("/var/cache/kvmpod/kernels")


def kernel_cache_dirs() -> list[Path]:
    """The kernel caches searched: the user's, then the system one (unless KVMPOD_CACHE_DIR is set)."""
    dirs = [kernels_dir()]
    if "KVMPOD_CACHE_DIR" not in os.environ and SYSTEM_KERNELS not in dirs:
        dirs.append(SYSTEM_KERNELS)
    return dirs


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    # Natural order: 6.1.0-56 > 6.1.0-9; numbers sort above words at the same position.
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.findall(r"\d+|[^\d]+", version))


def cached_kernels() -> list[GuestKernel]:
    """The usable kernels in the cache, best first. Broken entries are skipped."""
    found = []
    entries = []
    for directory in kernel_cache_dirs():
        try:
            entries.extend(sorted(directory.iterdir()))
        except OSError:
            continue
    for entry in entries:
        if entry.name.startswith(".") or not (entry / "kernel.json").is_file():
            continue  # temp dirs of a fetch in progress, the lock file, strays
        try:
            found.append(load_kernel_json(entry))
        except KernelError:
            continue
    found.sort(key=lambda k: _version_key(k.version), reverse=True)
    found.sort(key=lambda k: _KIND_RANK.get(k.kind, 9))
    return found


# --- resolving a user-given value ----------------------------------------------------------

def _from_value(value: str, source: str, base: Path | None = None) -> GuestKernel:
    """Resolve a --kernel / KVMPOD_KERNEL / config value; `source` names where it came from."""
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_dir():
        return load_kernel_json(path)
    if path.is_file():
        if path.name == "kernel.json":
            return load_kernel_json(path)
        return _from_image(path)
    if "/" not in value and value not in (".", ".."):
        for directory in kernel_cache_dirs():
            if (directory / value / "kernel.json").is_file():
                return load_kernel_json(directory / value)
        if value in KINDS:
            for kernel in cached_kernels():
                if kernel.kind == value:
                    return kernel
            raise KernelError(f"no {value} kernel in {kernels_dir()} ({source}): run `kvmpod setup --kernel-only`")
    raise KernelError(f"guest kernel not found: {path} ({source})")


def _config_value() -> tuple[str, Path] | None:
    """The last `kernel = "..."` in the config files, with the file it came from."""
    found = config_lookup("kernel")
    if found is None:
        return None
    if not isinstance(found.value, str) or not found.value:
        raise KernelError(f"\"kernel\" in config file {found.source} must be a non-empty string")
    return found.value, found.source


def find_kernel(explicit: str | None = None) -> GuestKernel:
    """Find the guest kernel (search order in the module docstring and docs/kernel.md)."""
    if explicit:
        return _from_value(explicit, "--kernel")
    if env := os.environ.get(ENV_VAR):
        return _from_value(env, f"${ENV_VAR}")
    if configured := _config_value():
        value, config_file = configured
        return _from_value(value, f"kernel in {config_file}", base=config_file.parent)
    kernels = cached_kernels()
    if kernels:
        return kernels[0]
    raise KernelError(f"no guest kernel found in {kernels_dir()}: run `kvmpod setup` (or pass --kernel PATH)")


def main(argv: list[str] | None = None) -> int:
    """`python -m kvmpod.boot.kernel [KERNEL]`: show which kernel would be used."""
    args = sys.argv[1:] if argv is None else argv
    try:
        kernel = find_kernel(args[0] if args else None)
    except KernelError as e:
        print(f"kvmpod: error: {e}", file=sys.stderr)
        return 1
    print(f"kind:    {kernel.kind}")
    print(f"version: {kernel.version or '(unknown)'}")
    print(f"image:   {kernel.image}")
    print(f"config:  {len(kernel.config)} options")
    print(f"modules: {kernel.modules_dir or '(none: all built in)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
