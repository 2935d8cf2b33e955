"""kvmpod.toml: the settings a host administrator may change (docs/layout.md lists the files).

The files of `paths.config_files()` are read in order and later ones win, key by key. They are
read on each call, not cached: they are tiny, and tests (and long-lived callers) change them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmpod import paths
from kvmpod.errors import ConfigError


@dataclass(frozen=True)
class ConfigValue:
    value: Any
    source: Path        # the file it came from: relative paths in it are relative to this file's directory

    def describe(self, key: str) -> str:
        return f"{key} in {self.source}"


def _load(config_file: Path) -> dict[str, Any] | None:
    try:
        with open(config_file, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read config file {config_file}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML in config file {config_file}: {e}") from e


def lookup(key: str, section: str | None = None) -> ConfigValue | None:
    """The last value of `key` (in table `section`, or at the top level) across the config files."""
    found = None
    for config_file in paths.config_files():
        data = _load(config_file)
        if data is None:
            continue
        if section is not None:
            data = data.get(section)
            if data is None:
                continue
            if not isinstance(data, dict):
                raise ConfigError(f"[{section}] in config file {config_file} must be a table")
        if key in data:
            found = ConfigValue(data[key], config_file)
    return found


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'16G', '512M', '100k' or a plain number of bytes (binary units, an optional 'i'/'iB'/'B' ignored)."""
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    number = cleaned.rstrip("kmgt")
    unit = cleaned[len(number):]
    if not number.isdigit() or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size like 16G, 512M or 1000000")
    return int(number) * _SIZE_UNITS[unit]


def size_setting(key: str, section: str, default: int) -> int:
    """A size in bytes from the config (an integer, or a string like "16G"), else `default`."""
    found = lookup(key, section)
    if found is None:
        return default
    where = found.describe(f"[{section}] {key}")
    value = found.value
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not a size")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where}: {value} must be positive")
        return value
    if isinstance(value, str):
        try:
            size = parse_size(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e
        if size < 1:
            raise ConfigError(f"{where}: {value!r} must be positive")
        return size
    raise ConfigError(f"{where}: {value!r} is not a size")


def int_setting(key: str, section: str, default: int) -> int:
    found = lookup(key, section)
    if found is None:
        return default
    if not isinstance(found.value, int) or isinstance(found.value, bool) or found.value < 1:
        raise ConfigError(f"{found.describe(f'[{section}] {key}')}: {found.value!r} is not a positive integer")
    return found.value


def bool_setting(key: str, section: str, default: bool) -> bool:
    """A true/false setting (e.g. `[security] cgroup = false`), else `default`."""
    found = lookup(key, section)
    if found is None:
        return default
    if not isinstance(found.value, bool):
        raise ConfigError(f"{found.describe(f'[{section}] {key}')}: {found.value!r} is not true or false")
    return found.value
