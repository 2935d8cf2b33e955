"""`kvmpod trust`: which keys may sign which image names (rkt's `rkt trust`; kvmpod/image/trust.py).

    kvmpod trust --prefix PREFIX [KEYFILE|URL...]   trust keys for PREFIX (none given: discovered)
    kvmpod trust --root KEYFILE...                   trust keys for every image
    kvmpod trust list [--json]
    kvmpod trust rm FINGERPRINT

Every key is shown with its fingerprint and must be confirmed on a terminal; a script says
`--skip-fingerprint-review`, having checked the fingerprint some other way. Everything is read and
reviewed before anything is stored: a refused or declined key leaves the trust store as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvmpod.errors import ImageError, UsageError
from kvmpod.image.limits import ImportLimits
from kvmpod.image.transfer import Transfer
from kvmpod.image.trust import KeyInfo, TrustStore, check_prefix, read_keys

KEY_LIMIT = 1 << 20     # a key file larger than this is not a key file


@dataclass(frozen=True)
class _Candidate:
    shown: str          # the file or URL, as the user sees it
    path: Path
    key: KeyInfo


def cmd_trust(ns: argparse.Namespace) -> int:
    words: list[str] = ns.words
    store = TrustStore()
    if ns.prefix is None and not ns.root:
        if words == ["list"]:
            return _list(store, ns.json)
        if words[:1] == ["rm"] and len(words) >= 2:
            for fingerprint in words[1:]:
                for path in store.remove(fingerprint):
                    print(f"removed {path}")
            return 0
        raise UsageError("trust: give --prefix PREFIX [KEYFILE...], --root KEYFILE..., list or rm FINGERPRINT")
    if ns.prefix is not None and ns.root:
        raise UsageError("trust: --prefix and --root exclude each other")
    if ns.root and not words:
        raise UsageError("trust --root: give the key files (root keys are never discovered)")
    prefix = None if ns.root else check_prefix(ns.prefix)
    transfer = Transfer.from_flags(ns.insecure_options, ns.ca_file)
    with tempfile.TemporaryDirectory(prefix="kvmpod-trust-") as work:
        sources = words or _discovered(prefix or "", transfer)
        candidates = [c for i, source in enumerate(sources)
                      for c in _read(source, Path(work) / f"key-{i}", transfer)]
        review = _Review(prefix, skip=ns.skip_fingerprint_review)
        for candidate in candidates:
            review.confirm(candidate)
        for candidate in candidates:
            path = store.add(prefix, candidate.path, candidate.key, candidate.shown)
            where = f'prefix "{prefix}"' if prefix else "every image (root)"
            print(f'Added key {candidate.key.fingerprint.lower()} for {where} at "{path}"', flush=True)
    return 0


def _discovered(prefix: str, transfer: Transfer) -> list[str]:
    from kvmpod.image.discovery import discover_pubkeys  # urllib, html.parser: only when discovering

    urls, page = discover_pubkeys(prefix, transfer)
    print(f"kvmpod: keys for {prefix} from {page}: {', '.join(urls)}", file=sys.stderr)
    return urls


def _read(source: str, scratch: Path, transfer: Transfer) -> list[_Candidate]:
    """The keys of a key file or URL, each checked: not expired, not revoked."""
    if source.startswith(("http://", "https://")):
        from kvmpod.image.fetch import download

        transfer.check_url(source, "of a key")
        if (source.startswith("http://") or transfer.insecure.tls) and not transfer.insecure.pubkey:
            raise ImageError(f"{source}: a key fetched without a verified TLS connection is refused "
                             "(add --insecure-options=pubkey to review it anyway)")
        download(source, scratch, ImportLimits(max_size=KEY_LIMIT), transfer=transfer)
        path = scratch
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{source}: no such key file")
    candidates = []
    for key in read_keys(path, source):
        if why := key.refusal():
            raise ImageError(f"{source}: key {key.fingerprint}: {why}: not trusted")
        candidates.append(_Candidate(source, path, key))
    return candidates


class _Review:
    """rkt's fingerprint review: shown and confirmed on a terminal, else refused unless skipped."""

    def __init__(self, prefix: str | None, skip: bool):
        self.prefix, self.skip = prefix, skip

    def confirm(self, candidate: _Candidate) -> None:
        key = candidate.key
        if self.skip:
            return
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise UsageError(f"{candidate.shown}: key {key.fingerprint}: the fingerprint is reviewed on a terminal "
                             "(check it, then --skip-fingerprint-review)")
        err = sys.stderr
        print(f'Prefix: "{self.prefix}"' if self.prefix else "Root key (every image)", file=err)
        print(f'Key: "{candidate.shown}"', file=err)
        print(f"GPG key fingerprint is: {key.spaced()}", file=err)
        for uid in key.uids:
            print(f"  {uid}", file=err)
        while True:
            print("Are you sure you want to trust this key (yes/no)? ", end="", file=err, flush=True)
            answer = sys.stdin.readline()
            if not answer or answer.strip().lower() in ("no", "n"):
                raise ImageError(f"{candidate.shown}: key {key.fingerprint}: not trusted (declined); nothing stored")
            if answer.strip().lower() in ("yes", "y"):
                return


def _list(store: TrustStore, as_json: bool) -> int:
    rows: list[dict[str, object]] = []
    table = [("PREFIX", "FINGERPRINT", "USER ID")]
    for trusted in store.keys():
        uids: list[str] = []
        expires: int | None = None
        try:
            info = read_keys(trusted.path)[0]
            uids, expires, problem = list(info.uids), info.expires, info.refusal()
        except ImageError as e:
            problem = str(e)
        rows.append({"prefix": trusted.prefix, "root": trusted.prefix is None, "fingerprint": trusted.fingerprint,
                     "path": str(trusted.path), "uids": uids, "expires": expires, "problem": problem})
        note = f" ({problem})" if problem else ""
        table.append((trusted.prefix or "(root)", trusted.fingerprint, (uids[0] if uids else "") + note))
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0
