"""ACI signatures (spec/aci.md): an ASCII-armored detached OpenPGP signature named `<image>.asc`.

A signature next to an image file (or at `<url>.asc`) is checked with `gpgv` against the trusted
keyring — `[image] trusted-keys` in kvmpod.toml, default `/etc/kvmpod/trustedkeys.gpg` — over
the image file exactly as distributed (compressed, as signed). The outcome is the image's
signature status in the store (docs/store.md):

* `verified <fingerprint>`: the signature is good and made by a trusted key;
* `unsigned`: there is no signature;
* `unverified`: there is a signature but no trusted keyring to check it with (a notice says so).

A signature that does not verify — bad, by an unknown key, expired or revoked — refuses the
import: a signature that fails is a warning sign, never a detail.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmpod.config import lookup
from kvmpod.errors import ImageError, printable

DEFAULT_KEYRING = Path("/etc/kvmpod/trustedkeys.gpg")
SIGNATURE_SUFFIX = ".asc"
UNSIGNED = "unsigned"
UNVERIFIED = "unverified"
_GPGV_TIMEOUT = 60


@dataclass(frozen=True)
class SignatureCheck:
    status: str                 # "verified <fingerprint>", "unsigned" or "unverified"
    notice: str | None = None   # one line for the user, when there is something to say


def trusted_keyring() -> Path:
    found = lookup("trusted-keys", "image")
    if found is None:
        return DEFAULT_KEYRING
    if not isinstance(found.value, str) or not found.value:
        raise ImageError(f"{found.describe('[image] trusted-keys')}: must be the path of a keyring file")
    path = Path(found.value)
    return path if path.is_absolute() else found.source.parent / path


def signature_path(image: Path) -> Path:
    return image.with_name(image.name + SIGNATURE_SUFFIX)


def check_signature(image: Path, signature: Path | None, shown: str) -> SignatureCheck:
    """Check `signature` (None or missing: unsigned) over `image`; refuse one that does not verify."""
    if signature is None or not signature.is_file():
        return SignatureCheck(UNSIGNED)
    keyring = trusted_keyring()
    if not keyring.is_file():
        return SignatureCheck(UNVERIFIED, f"{shown}: signature not checked: no trusted keys in {keyring} "
                                          "([image] trusted-keys in kvmpod.toml)")
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise ImageError(f"{shown}: is signed, and checking signatures needs gpgv (Debian package gpgv)")
    try:
        done = subprocess.run([gpgv, "--status-fd", "1", "--keyring", str(keyring), str(signature), str(image)],
                              capture_output=True, text=True, timeout=_GPGV_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"{shown}: gpgv did not finish checking the signature in {_GPGV_TIMEOUT} s") from e
    status = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("[GNUPG:] ")]
    valid = next((words for words in status if words and words[0] == "VALIDSIG"), None)
    if done.returncode == 0 and valid is not None and len(valid) > 1:
        return SignatureCheck(f"verified {valid[1]}")
    raise ImageError(f"{shown}: signature {signature.name} does not verify against {keyring}: {_why(status)}")


def _why(status: list[list[str]]) -> str:
    """gpgv's reason, from its status lines (doc/DETAILS in GnuPG)."""
    reasons = {"BADSIG": "bad signature (the image or the signature was altered)",
               "NO_PUBKEY": "made by a key that is not trusted",
               "EXPKEYSIG": "made by an expired key", "REVKEYSIG": "made by a revoked key",
               "EXPSIG": "the signature has expired", "NODATA": "not an OpenPGP signature"}
    for words in status:
        if words and words[0] in reasons:
            key = f" ({printable(words[1])})" if len(words) > 1 and words[0] != "NODATA" else ""
            return reasons[words[0]] + key
    return "gpgv refused it"
