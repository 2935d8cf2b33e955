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

The trusted keys are those of the trust store (`kvmpod trust`, kvmpod/image/trust.py) and the
keyring of `[image] trusted-keys`. The policy (`admit`) then asks for more where the trust store
says so: an image named under a trusted prefix (or any image, with a root key or `[image]
require-signatures = true`) must carry a good signature by a key trusted for its name.
`--insecure-options=image` turns both the refusal of a failing signature and the policy into a
notice for one command.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmpod.config import bool_setting, lookup
from kvmpod.errors import ImageError, PolicyError, printable
from kvmpod.image.trust import Requirement, TrustStore, read_keys

DEFAULT_KEYRING = Path("/etc/kvmpod/trustedkeys.gpg")
SIGNATURE_SUFFIX = ".asc"
UNSIGNED = "unsigned"
UNVERIFIED = "unverified"
NOT_CHECKED = "not-checked"     # converted from Docker/OCI (kvmpod/store/index.py SIGNATURE_NOT_CHECKED)
_GPGV_TIMEOUT = 60


@dataclass(frozen=True)
class SignatureCheck:
    status: str                 # "verified <fingerprint>", "unsigned" or "unverified"
    notice: str | None = None   # one line for the user, when there is something to say
    untrusted: str | None = None  # the signature is by this key, which no keyring holds: the policy decides
    signature: str = ""         # the signature's file name, for messages


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


def check_signature(image: Path, signature: Path | None, shown: str, skip: bool = False,
                    signature_shown: str | None = None) -> SignatureCheck:
    """Check `signature` (None or missing: unsigned) over `image`; refuse one that does not verify.

    A signature by a key no keyring holds is not refused here: `admit` decides once the image's name
    is known, so that the refusal can name the prefix. With `skip` (--insecure-options=image) a failing
    signature is a notice and the status `unverified`."""
    if signature is None or not signature.is_file():
        return SignatureCheck(UNSIGNED)
    named = signature_shown or signature.name
    legacy = trusted_keyring()
    keyrings = [*TrustStore().keyrings(), *([legacy] if legacy.is_file() else [])]
    if not keyrings:
        return SignatureCheck(UNVERIFIED, f"{shown}: signature not checked: no trusted keys (kvmpod trust, "
                                          f"or a keyring in {legacy}: [image] trusted-keys in kvmpod.toml)",
                              signature=named)
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise ImageError(f"{shown}: is signed, and checking signatures needs gpgv (Debian package gpgv)")
    command = [gpgv, "--status-fd", "1"]
    for keyring in keyrings:
        command += ["--keyring", str(keyring.absolute())]
    try:
        done = subprocess.run([*command, str(signature), str(image)], capture_output=True, text=True,
                              timeout=_GPGV_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"{shown}: gpgv did not finish checking the signature in {_GPGV_TIMEOUT} s") from e
    status = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("[GNUPG:] ")]
    valid = next((words for words in status if words and words[0] == "VALIDSIG"), None)
    # gpgv accepts a signature that a key made before it expired or was revoked (exit 0, VALIDSIG);
    # a key past its life signs nothing here
    dead = any(words and words[0] in ("EXPKEYSIG", "REVKEYSIG", "EXPSIG") for words in status)
    if done.returncode == 0 and valid is not None and len(valid) > 1 and not dead:
        return SignatureCheck(f"verified {valid[10] if len(valid) > 10 else valid[1]}", signature=named)
    unknown = next((words for words in status if words and words[0] == "NO_PUBKEY" and len(words) > 1), None)
    if unknown is not None and not any(words and words[0] in ("BADSIG", "EXPKEYSIG", "REVKEYSIG")
                                       for words in status):
        return SignatureCheck(UNVERIFIED, untrusted=printable(unknown[1]), signature=named)
    failure = f"{shown}: signature {named} does not verify against the trusted keys: {_why(status)}"
    if skip:
        return SignatureCheck(UNVERIFIED, f"{failure}; taken anyway (--insecure-options=image)",
                              signature=named)
    raise ImageError(failure)


def admit(name: str, check: SignatureCheck, shown: str, skip: bool = False,
          hint: str = "") -> SignatureCheck:
    """The signature policy for an image named `name` whose signature check came out as `check` (or, for
    an image already in the store, whose recorded status it is). Refuses in one line naming the image,
    the prefix and what is missing; with `skip` the refusal becomes a notice. `hint` says where the
    publisher's keys are (discovery's ac-discovery-pubkeys)."""
    store = TrustStore()
    keys = store.keys()
    required = store.requirement(name, keys)
    if check.status == NOT_CHECKED:  # Docker/OCI images carry no appc signature: only the switch asks for one
        if not bool_setting("require-signatures", "image", False):
            return check
        required = Requirement("config")
    problem: str | None = None
    if check.untrusted is not None:
        problem = (f"{shown}: image {name}: signature {check.signature or 'of the image'} is by key "
                   f"{check.untrusted}, which is not trusted" + _for(required))
    elif required is not None:
        problem = _missing(name, check, shown, required, store.trusted_for(name, keys))
    if problem is None:
        return check
    if skip:
        return SignatureCheck(check.status, f"{problem}; taken anyway (--insecure-options=image)")
    raise PolicyError(problem + _how(name, required, hint))


def _missing(name: str, check: SignatureCheck, shown: str, required: Requirement, trusted: set[str]) -> str | None:
    if check.status.startswith("verified "):
        fingerprint = check.status.split()[1].upper()
        if fingerprint in trusted or fingerprint in _legacy_fingerprints():
            return None
        return (f"{shown}: image {name} falls under {required} and is signed by key {fingerprint}, "
                f"which is not trusted for it")
    what = {UNSIGNED: "has no signature", NOT_CHECKED: "is a Docker/OCI image, with no appc signature"}.get(
        check.status, "has no signature checked by a trusted key")
    return f"{shown}: image {name} falls under {required} and {what}"


def _legacy_fingerprints() -> set[str]:
    """The keys of `[image] trusted-keys`: trusted for every name (as root keys are), though they do
    not by themselves ask for signatures."""
    keyring = trusted_keyring()
    return {key.fingerprint for key in read_keys(keyring)} if keyring.is_file() else set()


def _for(required: Requirement | None) -> str:
    return f" for {required}" if required is not None else ""


def _how(name: str, required: Requirement | None, hint: str) -> str:
    prefix = required.prefix if required is not None and required.kind == "prefix" else name
    where = f" (publisher's keys: {hint})" if hint else ""
    return f": refused (kvmpod trust --prefix {prefix} KEYFILE{where}, or --insecure-options=image)"


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
