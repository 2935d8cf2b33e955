"""Where kvmpod keeps things: the runtime pod dirs, the image store and the build caches.

Root uses system locations; other users get their XDG directories. Environment overrides
exist for tests and packagers (documented in docs/layout.md). What the package itself carries (data
files, the agent binaries) is found by kvmpod/resources.py.
"""

from __future__ import annotations

import os
from pathlib import Path


def _is_root() -> bool:
    return os.geteuid() == 0


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def runtime_dir() -> Path:
    """Pod directories live here (tmpfs: they do not survive a host reboot, nor should pods)."""
    if env := os.environ.get("KVMPOD_RUN_DIR"):
        return Path(env)
    return default_runtime_dir()


def default_runtime_dir() -> Path:
    """The runtime dir without KVMPOD_RUN_DIR."""
    if _is_root():
        return Path("/run/kvmpod")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "kvmpod" if xdg else Path("/tmp") / f"kvmpod-{os.getuid()}"


def pods_dir() -> Path:
    """One directory per pod, named by its UUID (docs/layout.md): listed by the registry, checked by
    networking (a lease whose pod directory is gone is stale)."""
    return runtime_dir() / "pods"


_store_override: Path | None = None


def set_store_dir(path: str | Path) -> None:
    """`kvmpod --dir DIR`: this process's store (it wins over the environment)."""
    global _store_override
    _store_override = Path(path).absolute()


def store_dir() -> Path:
    if _store_override is not None:
        return _store_override
    if env := os.environ.get("KVMPOD_STORE_DIR"):
        return Path(env)
    if _is_root():
        return Path("/var/lib/kvmpod")
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else _home() / ".local" / "share") / "kvmpod"


def cache_dir() -> Path:
    """Guest kernels and initrds: rebuildable, so a cache, not the store."""
    if env := os.environ.get("KVMPOD_CACHE_DIR"):
        return Path(env)
    if _is_root():
        return Path("/var/cache/kvmpod")
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else _home() / ".cache") / "kvmpod"


def snapshots_dir() -> Path:
    """Boot snapshots (kvmpod/boot/snapshot.py): a cache too, in its own directory so that tests and
    benchmarks can keep theirs apart (KVMPOD_SNAPSHOT_DIR) while sharing the kernel cache."""
    if env := os.environ.get("KVMPOD_SNAPSHOT_DIR"):
        return Path(env)
    return cache_dir() / "snapshots"


def config_files() -> list[Path]:
    """Config files, later ones overriding earlier ones."""
    files = [Path("/etc/kvmpod/kvmpod.toml")]
    xdg = os.environ.get("XDG_CONFIG_HOME")
    files.append((Path(xdg) if xdg else _home() / ".config") / "kvmpod" / "kvmpod.toml")
    if env := os.environ.get("KVMPOD_CONFIG"):
        files.append(Path(env))
    return files


def audit_log() -> Path:
    """The append-only audit log of pods (kvmpod/pod/audit.py)."""
    if env := os.environ.get("KVMPOD_AUDIT_LOG"):
        return Path(env)
    if _is_root():
        return Path("/var/log/kvmpod/audit.log")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else _home() / ".local" / "state") / "kvmpod" / "audit.log"


def trust_dir() -> Path:
    """Where `kvmpod trust` writes keys (kvmpod/image/trust.py): /etc/kvmpod/trust for root, the user's
    config dir otherwise; KVMPOD_TRUST_DIR overrides it (tests, packagers)."""
    if env := os.environ.get("KVMPOD_TRUST_DIR"):
        return Path(env)
    if _is_root():
        return SYSTEM_TRUST_DIR
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else _home() / ".config") / "kvmpod" / "trust"


SYSTEM_TRUST_DIR = Path("/etc/kvmpod/trust")


def trust_dirs() -> list[Path]:
    """Every trust store the signature policy reads: the administrator's and, for a user, their own
    (KVMPOD_TRUST_DIR alone when set)."""
    mine = trust_dir()
    if os.environ.get("KVMPOD_TRUST_DIR") or mine == SYSTEM_TRUST_DIR:
        return [mine]
    return [SYSTEM_TRUST_DIR, mine]
