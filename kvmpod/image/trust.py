"""rkt's trust store: which OpenPGP keys may sign which image names.

Layout (docs/store.md, "Trust"), under each of paths.trust_dirs():
    prefix.d/<prefix>/<fingerprint>   a key trusted for images named <prefix> or <prefix>/...
    root.d/<fingerprint>              a key trusted for every image
Each file holds one public key in binary form (what gpgv reads), named by its lower-case fingerprint;
an empty file disables a key of that fingerprint shipped in an earlier directory (rkt's rule). Keys are
read with `gpg --show-keys --with-colons` and signatures checked with gpgv (kvmpod/image/signature.py):
nothing here parses OpenPGP.

The policy (kvmpod/image/signature.py admit): an image whose name falls under a prefix with a key,
any image once a root key exists, or any image with `[image] require-signatures = true`, must be
signed by a key trusted for its name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvmpod import paths
from kvmpod.config import bool_setting
from kvmpod.errors import ImageError, UsageError, printable

_GPG_TIMEOUT = 60
_FINGERPRINT = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
# An AC Name (spec/types.md): what a prefix must be, so that it is also a safe relative path.
_AC_NAME = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*$")


@dataclass(frozen=True)
class KeyInfo:
    """One public key as `gpg --show-keys --with-colons` describes it (GnuPG's doc/DETAILS)."""
    fingerprint: str            # upper-case hex, as gpg prints it
    uids: tuple[str, ...]
    validity: str               # field 2: "e" expired, "r" revoked, else something else
    created: int
    expires: int | None

    def refusal(self) -> str | None:
        """Why this key may not be trusted, or None."""
        if self.validity == "r":
            return "the key is revoked"
        if self.validity == "e" or (self.expires is not None and self.expires <= time.time()):
            when = time.strftime("%Y-%m-%d", time.gmtime(self.expires)) if self.expires else "already"
            return f"the key expired ({when})"
        return None

    def spaced(self) -> str:
        """`8B86 DE38 890D DB72 9186  7B02 5210 BD88 8818 2190`, as rkt and gpg show it."""
        groups = [self.fingerprint[i:i + 4] for i in range(0, len(self.fingerprint), 4)]
        half = len(groups) // 2
        return " ".join(groups[:half]) + "  " + " ".join(groups[half:])


@dataclass(frozen=True)
class TrustedKey:
    prefix: str | None          # None: a root key
    fingerprint: str            # lower-case hex (the file's name)
    path: Path


@dataclass(frozen=True)
class Requirement:
    """Why an image must be signed: the prefix it falls under, a root key, or the config switch."""
    kind: str                   # "prefix", "root" or "config"
    prefix: str = ""

    def __str__(self) -> str:
        if self.kind == "prefix":
            return f"trusted prefix {self.prefix}"
        if self.kind == "root":
            return "a root key (every image)"
        return "[image] require-signatures"


def _gpg() -> str:
    gpg = shutil.which("gpg")
    if gpg is None:
        raise ImageError("reading OpenPGP keys needs gpg (Debian package gnupg)")
    return gpg


def _run_gpg(args: list[str], home: Path, shown: str, binary: bool = False) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_gpg(), "--homedir", str(home), "--batch", "--no-tty", "--quiet", *args],
                              capture_output=True, text=not binary, timeout=_GPG_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"{shown}: gpg did not finish reading the key in {_GPG_TIMEOUT} s") from e


class _GpgHome:
    """A throwaway GNUPGHOME: reading a key file must not touch the user's keyrings."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="kvmpod-gpg-"))
        return self.path

    def __exit__(self, *exc: object) -> None:
        if shutil.which("gpgconf"):
            subprocess.run(["gpgconf", "--homedir", str(self.path), "--kill", "all"], capture_output=True,
                           check=False)
        shutil.rmtree(self.path, ignore_errors=True)


def read_keys(path: Path, shown: str | None = None) -> list[KeyInfo]:
    """The public keys in a key file (armored or binary); an ImageError names the file if it holds none."""
    shown = shown or str(path)
    with _GpgHome() as home:
        done = _run_gpg(["--with-colons", "--fixed-list-mode", "--show-keys", str(path)], home, shown)
    keys: list[KeyInfo] = []
    pub: list[str] | None = None
    uids: list[str] = []
    fingerprint = ""

    def close() -> None:
        if pub is not None and fingerprint:
            keys.append(KeyInfo(fingerprint, tuple(uids), pub[1], int(pub[5] or 0),
                                int(pub[6]) if len(pub) > 6 and pub[6] else None))

    for line in done.stdout.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            close()
            pub, uids, fingerprint = fields, [], ""
        elif fields[0] == "fpr" and pub is not None and not fingerprint:
            fingerprint = fields[9].upper()
        elif fields[0] == "uid" and pub is not None and len(fields) > 9:
            uids.append(_unescape(fields[9]))
    close()
    if not keys:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no public key in it"
        raise ImageError(f"{shown}: not an OpenPGP public key file ({printable(why)})")
    return keys


def _unescape(text: str) -> str:
    """gpg's colon format escapes bytes as \\xHH."""
    return printable(re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text))


def export_key(path: Path, fingerprint: str, shown: str) -> bytes:
    """The key `fingerprint` of the key file `path`, alone and binary (gpgv's keyring format)."""
    with _GpgHome() as home:
        imported = _run_gpg(["--import", str(path)], home, shown)
        if imported.returncode != 0:
            raise ImageError(f"{shown}: gpg cannot import the key: {printable(imported.stderr.strip())}")
        done = _run_gpg(["--export", fingerprint], home, shown, binary=True)
    if done.returncode != 0 or not done.stdout:
        raise ImageError(f"{shown}: gpg cannot export key {fingerprint}")
    data: bytes = done.stdout
    return data


def check_prefix(prefix: str) -> str:
    if not _AC_NAME.match(prefix):
        raise UsageError(f"--prefix {prefix}: not an image name prefix (an AC Name such as example.com/app)")
    return prefix


def normal_fingerprint(text: str) -> str:
    """`8B86 DE38 …` or `8b86de38…` -> lower-case hex without spaces; a UsageError otherwise."""
    fingerprint = re.sub(r"\s+", "", text).lower().removeprefix("0x")
    if not _FINGERPRINT.match(fingerprint):
        raise UsageError(f"{text}: not a key fingerprint (40 hex digits, spaces allowed)")
    return fingerprint


def prefixes_of(name: str) -> list[str]:
    """`a.com/b/c` -> `a.com/b/c`, `a.com/b`, `a.com`: the prefixes a name falls under, longest first."""
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


class TrustStore:
    def __init__(self, dirs: list[Path] | None = None, write_dir: Path | None = None):
        self.dirs = dirs if dirs is not None else paths.trust_dirs()
        self.write_dir = write_dir or (self.dirs[-1] if dirs is not None else paths.trust_dir())

    def keys(self) -> list[TrustedKey]:
        """Every trusted key, later directories overriding earlier ones (an empty file disables one)."""
        found: dict[tuple[str | None, str], TrustedKey | None] = {}
        for base in self.dirs:
            for path in sorted((base / "root.d").glob("*")):
                if _FINGERPRINT.match(path.name) and path.is_file():
                    found[(None, path.name)] = TrustedKey(None, path.name, path) if path.stat().st_size else None
            prefix_dir = base / "prefix.d"
            for path in sorted(prefix_dir.glob("**/*")) if prefix_dir.is_dir() else []:
                if _FINGERPRINT.match(path.name) and path.is_file():
                    prefix = path.parent.relative_to(prefix_dir).as_posix()
                    key = TrustedKey(prefix, path.name, path) if path.stat().st_size else None
                    found[(prefix, path.name)] = key
        return [k for k in found.values() if k is not None]

    def keyrings(self) -> list[Path]:
        return [k.path for k in self.keys()]

    def requirement(self, name: str, keys: list[TrustedKey] | None = None) -> Requirement | None:
        keys = self.keys() if keys is None else keys
        prefixes = {k.prefix for k in keys}
        for prefix in prefixes_of(name):
            if prefix in prefixes:
                return Requirement("prefix", prefix)
        if None in prefixes:
            return Requirement("root")
        if bool_setting("require-signatures", "image", False):
            return Requirement("config")
        return None

    def trusted_for(self, name: str, keys: list[TrustedKey] | None = None) -> set[str]:
        """Upper-case fingerprints of the keys that may sign an image of this name."""
        keys = self.keys() if keys is None else keys
        under = set(prefixes_of(name))
        return {k.fingerprint.upper() for k in keys if k.prefix is None or k.prefix in under}

    def add(self, prefix: str | None, source: Path, info: KeyInfo, shown: str) -> Path:
        """Store the key `info` of the file `source` for `prefix` (None: root); returns its path."""
        directory = self.write_dir / "root.d" if prefix is None else self.write_dir / "prefix.d" / check_prefix(prefix)
        data = export_key(source, info.fingerprint, shown)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".key-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.chmod(tmp, 0o644)
                target = directory / info.fingerprint.lower()
                os.replace(tmp, target)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            raise ImageError(f"{directory}: cannot store the trusted key: {e.strerror}") from e
        return target

    def remove(self, fingerprint: str) -> list[Path]:
        """Remove the key from every prefix of the writable trust dir; the paths removed."""
        fingerprint = normal_fingerprint(fingerprint)
        removed = []
        for key in self.keys():
            if key.fingerprint == fingerprint and key.path.is_relative_to(self.write_dir):
                try:
                    key.path.unlink()
                except OSError as e:
                    raise ImageError(f"{key.path}: cannot remove the key: {e.strerror}") from e
                removed.append(key.path)
                parent = key.path.parent
                while parent != self.write_dir and parent.parent != self.write_dir:
                    try:
                        parent.rmdir()  # an emptied prefix directory goes too
                    except OSError:
                        break
                    parent = parent.parent
        if not removed:
            others = [str(k.path) for k in self.keys() if k.fingerprint == fingerprint]
            where = f" (it is in {others[0]}, which is not yours to change)" if others else ""
            raise ImageError(f"{fingerprint}: no such trusted key in {self.write_dir}{where}")
        return removed
