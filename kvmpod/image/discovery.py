"""appc image discovery (spec/discovery.md): from an image name and labels to the URLs of its ACI, its
signature and its publisher's keys.

Meta discovery: `https://{name}?ac-discovery=1` is fetched and its HTML searched for
`<meta name="ac-discovery" content="PREFIX URL-TEMPLATE">` and `<meta name="ac-discovery-pubkeys"
content="PREFIX URL">` tags whose PREFIX the name starts with; a 4xx answer or a page without such tags
sends discovery to the name's parent path (example.com/a/b, then example.com/a, then example.com). Of
the templates, only the best matching are used: those whose every `{label}` can be filled, with the
most labels filled. Without a version, only templates without `{version}` can match: the spec's
"latest" pattern (`{name}-latest.{ext}`).

Simple discovery (appc <= 0.5), tried when meta discovery finds no tags and a version is given:
`https://{name}-{version}-{os}-{arch}.{ext}`.

The discovery URL of a host that does not serve https on 443 can be given a port in kvmpod.toml:
`[image] discovery-ports = { "images.internal" = 8443 }` (the templates carry their own ports).
Plain http only with `--insecure-options=http` (tried after https fails to connect).
"""

from __future__ import annotations

import platform
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser

from kvmpod.config import lookup
from kvmpod.errors import ConfigError, ImageError, printable
from kvmpod.image.transfer import Transfer
from kvmpod.image.trust import prefixes_of
from kvmpod.version import __version__

TIMEOUT = 30.0
MAX_PAGE = 1 << 20          # a discovery page is a few meta tags; more is not read
_PLACEHOLDER = re.compile(r"\{([a-z]+)\}")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "i386": "i386", "i686": "i386", "aarch64": "aarch64",
         "arm64": "aarch64", "armv7l": "armv7l", "armv6l": "armv6l", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass(frozen=True)
class Found:
    aci: str                        # the image's URL
    signature: str                  # its detached signature's URL
    pubkeys: tuple[str, ...]        # where the publisher's keys are (ac-discovery-pubkeys), maybe none
    how: str                        # "meta discovery at URL" / "simple discovery"


def host_labels() -> dict[str, str]:
    """The os and arch labels of this host, in appc's spelling (spec/types.md: amd64, aarch64, ...)."""
    machine = platform.machine()
    return {"os": "linux", "arch": _ARCH.get(machine, machine.lower())}


def discovery_port(host: str) -> int | None:
    found = lookup("discovery-ports", "image")
    if found is None:
        return None
    if not isinstance(found.value, dict):
        raise ConfigError(f"{found.describe('[image] discovery-ports')}: must be a table of host = port")
    port = found.value.get(host)
    if port is None:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"{found.describe('[image] discovery-ports')}: {host} = {port!r} is not a port number")
    return port


def _url(scheme: str, path: str, query: str = "") -> str:
    host, _, rest = path.partition("/")
    port = discovery_port(host)
    netloc = f"{host}:{port}" if port else host
    return f"{scheme}://{netloc}/{urllib.parse.quote(rest, safe='/~')}{query}"


class _MetaTags(HTMLParser):
    """The `<meta name=... content=...>` tags of a page (html.parser: real HTML, not regexes)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "meta":
            values = dict(attrs)
            if values.get("name") and values.get("content"):
                self.tags.append((str(values["name"]), str(values["content"])))

    handle_startendtag = handle_starttag


def meta_tags(html: str, name: str) -> tuple[list[str], list[str]]:
    """The ac-discovery templates and ac-discovery-pubkeys URLs of `html` whose prefix `name` matches."""
    parser = _MetaTags()
    parser.feed(html)
    parser.close()
    templates: list[str] = []
    pubkeys: list[str] = []
    for tag, content in parser.tags:
        words = content.split()
        if tag not in ("ac-discovery", "ac-discovery-pubkeys") or len(words) != 2:
            continue
        prefix, url = words
        if name.startswith(prefix):
            (templates if tag == "ac-discovery" else pubkeys).append(url)
    return templates, pubkeys


def best_templates(templates: list[str], labels: dict[str, str]) -> list[str]:
    """The spec's "best matching templates": every placeholder fillable, the most labels filled."""
    fillable = [t for t in templates if set(_PLACEHOLDER.findall(t)) <= set(labels) | {"name", "ext"}]
    if not fillable:
        return []
    most = max(len(set(_PLACEHOLDER.findall(t))) for t in fillable)
    return [t for t in fillable if len(set(_PLACEHOLDER.findall(t))) == most]


def render(template: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: urllib.parse.quote(values[m.group(1)], safe="/~"), template)


def fetch_page(url: str, transfer: Transfer) -> str | int:
    """The body of a discovery page, or the status of a 4xx answer (the spec's "try the parent path")."""
    request = urllib.request.Request(url, headers={"User-Agent": f"kvmpod/{__version__}", "Accept": "text/html"})
    try:
        with transfer.opener().open(request, timeout=TIMEOUT) as response:
            body: bytes = response.read(MAX_PAGE)
            charset = response.headers.get_content_charset() or "utf-8"
            return body.decode(charset, errors="replace")
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500:
            return e.code
        raise ImageError(f"{url}: discovery failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise ImageError(f"{url}: discovery failed: {printable(str(e.reason))}{transfer.tls_hint(e.reason)}") from e
    except (OSError, ValueError) as e:
        raise ImageError(f"{url}: discovery failed: {e}") from e


def _page(path: str, transfer: Transfer) -> tuple[str, str | int]:
    """The discovery page of `path` (https, then http with --insecure-options=http) and its URL."""
    url = _url("https", path, "?ac-discovery=1")
    try:
        return url, fetch_page(url, transfer)
    except ImageError:
        if not transfer.insecure.http:
            raise
        url = _url("http", path, "?ac-discovery=1")
        return url, fetch_page(url, transfer)


def _usable(url: str, transfer: Transfer) -> bool:
    return url.startswith("https://") or (url.startswith("http://") and transfer.insecure.http)


def discover(name: str, labels: dict[str, str], transfer: Transfer) -> Found:
    """Where the image `name` with `labels` (version, os, arch) is; an ImageError names what was tried."""
    tried: list[str] = []
    for path in prefixes_of(name):
        url, html = _page(path, transfer)
        if isinstance(html, int):
            tried.append(f"{url}: HTTP {html}")
            continue
        templates, pubkeys = meta_tags(html, name)
        if not templates:
            tried.append(f"{url}: no ac-discovery meta tag for {name}")
            continue
        best = best_templates(templates, labels)
        usable = [t for t in best if _usable(t, transfer)]
        if not usable:
            need = "" if "version" in labels else " (give NAME:VERSION: none matches without a version)"
            what = "can be filled from the labels" if not best else "is https (or http with --insecure-options=http)"
            raise ImageError(f"{name}: {url}: no ac-discovery template {what}{need}")
        https = [t for t in usable if t.startswith("https://")]
        template = (https or usable)[0]
        values = {"name": name, **labels}
        return Found(render(template, {**values, "ext": "aci"}), render(template, {**values, "ext": "aci.asc"}),
                     tuple(pubkeys), f"meta discovery at {url}")
    if "version" in labels:
        values = {"name": name, **labels}
        simple = _url("https", f"{values['name']}-{values['version']}-{values['os']}-{values['arch']}.aci")
        return Found(simple, simple + ".asc", (), "simple discovery (" + "; ".join(tried) + ")")
    raise ImageError(f"{name}: not found by appc discovery ({'; '.join(tried)}; simple discovery needs "
                     "NAME:VERSION)")


def discover_pubkeys(prefix: str, transfer: Transfer) -> tuple[list[str], str]:
    """The ac-discovery-pubkeys URLs for `prefix` (`kvmpod trust --prefix P` without a key file) and
    the page they came from."""
    tried: list[str] = []
    for path in prefixes_of(prefix):
        url, html = _page(path, transfer)
        if isinstance(html, int):
            tried.append(f"{url}: HTTP {html}")
            continue
        _, pubkeys = meta_tags(html, prefix)
        usable = [k for k in pubkeys if _usable(k, transfer)]
        if usable:
            return usable, url
        tried.append(f"{url}: no usable ac-discovery-pubkeys meta tag for {prefix}" if pubkeys
                     else f"{url}: no ac-discovery-pubkeys meta tag for {prefix}")
    raise ImageError(f"--prefix {prefix}: no keys found by discovery ({'; '.join(tried)})")
