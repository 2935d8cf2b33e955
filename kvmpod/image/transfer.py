"""How images may reach this host over a network: rkt's `--insecure-options` and the TLS trust anchors.

One value (`Transfer`) travels from the command line (`kvmpod fetch`, `kvmpod run`, `kvmpod trust`) to
every place that downloads or checks something: URL imports (fetch.py), appc discovery, registry pulls
(`docker://`) and the signature policy. Each relaxation is explicit and lasts one command:

    image   run or store an image whose signature the policy would refuse (unsigned, unknown key)
    http    allow plain http:// (discovery, registries, key fetching)
    tls     accept a TLS certificate that does not verify (self-signed, wrong name)
    pubkey  accept keys fetched by discovery without a trusted chain (still shown for review)
    all     all of the above

The names and spelling are rkt's (`rkt fetch --insecure-options=image,http`). A CA file adds trust
anchors without turning verification off: the way to use a private registry or discovery server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpod.errors import UsageError

if TYPE_CHECKING:
    import ssl
    import urllib.request

INSECURE_WORDS = ("image", "http", "tls", "pubkey")


@dataclass(frozen=True)
class InsecureOptions:
    image: bool = False
    http: bool = False
    tls: bool = False
    pubkey: bool = False

    @classmethod
    def parse(cls, text: str) -> InsecureOptions:
        """`image,http` / `all` / `none` / `` -> the options; an unknown word is a UsageError naming it."""
        chosen: dict[str, bool] = {}
        for word in (w.strip() for w in text.split(",")):
            if word in ("", "none"):
                continue
            if word == "all":
                chosen.update(dict.fromkeys(INSECURE_WORDS, True))
            elif word in INSECURE_WORDS:
                chosen[word] = True
            else:
                raise UsageError(f"--insecure-options: unknown option {word!r} "
                                 f"(choose from {', '.join(INSECURE_WORDS)}, all, none)")
        return cls(**chosen)

    def __str__(self) -> str:
        words = [w for w in INSECURE_WORDS if getattr(self, w)]
        return ",".join(words) or "none"


@dataclass(frozen=True)
class Transfer:
    insecure: InsecureOptions = InsecureOptions()
    ca_file: Path | None = None     # extra trust anchors for https (PEM), on top of the system's

    @classmethod
    def from_flags(cls, insecure_options: str, ca_file: str | None) -> Transfer:
        """`--insecure-options OPTS` and `--ca-file FILE` as given on the command line."""
        return cls(InsecureOptions.parse(insecure_options), Path(ca_file) if ca_file else None)

    def with_insecure(self, **words: bool) -> Transfer:
        return dataclasses.replace(self, insecure=dataclasses.replace(self.insecure, **words))

    def check_url(self, url: str, what: str = "download") -> None:
        """Refuse plain http unless `--insecure-options=http`; the error names the URL."""
        if url.startswith("http://") and not self.insecure.http:
            raise UsageError(f"{url}: plain http {what} refused (use https, or --insecure-options=http)")

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib with ssl_context() for https, following redirects but never from https down to plain
        http without `--insecure-options=http` (a redirect to http is refused before it is asked)."""
        import urllib.request  # lazy, like ssl

        return urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.ssl_context()),
                                           _redirects(self)())

    def tls_hint(self, reason: object) -> str:
        """` (…)`: what to do about a certificate that did not verify, for a download's error line."""
        import ssl

        if isinstance(reason, ssl.SSLCertVerificationError) and not self.insecure.tls:
            return " (a private CA: --ca-file FILE; or --insecure-options=tls)"
        return ""

    def ssl_context(self) -> ssl.SSLContext:
        """The context for https: the system's anchors plus `ca_file`; no verification with tls."""
        import ssl  # lazy: only a network command pays for it

        context = ssl.create_default_context()
        if self.ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"--ca-file {self.ca_file}: not a readable PEM certificate file ({e})") from e
        if self.insecure.tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _redirects(transfer: Transfer) -> type:
    """A redirect handler bound to `transfer` (a class made on use: urllib.request is imported lazily)."""
    import urllib.request
    from http.client import HTTPMessage
    from typing import IO

    class NoDowngrade(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                             headers: HTTPMessage, newurl: str) -> urllib.request.Request | None:
            if newurl.startswith("http://") and not transfer.insecure.http:
                raise UsageError(f"{req.full_url}: redirected to plain http {newurl} "
                                 "(refused without --insecure-options=http)")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return NoDowngrade
