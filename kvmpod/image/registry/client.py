"""Talking to one registry for one image: the OCI distribution API over urllib.

    GET /v2/                          the ping: which scheme answers, and whether it wants auth
    GET /v2/<repo>/manifests/<ref>    a manifest or index by tag or digest (Accept: the four types)
    GET /v2/<repo>/blobs/<digest>     a config or layer; the registry may redirect (storage, CDN)

https is verified with Transfer.ssl_context() (the system's anchors, --ca-file; nothing with
--insecure-options=tls). Plain http needs --insecure-options=http: then https is tried first and
http used when the port does not speak TLS, as docker does for an insecure registry. Redirects
are checked the same way (no https -> http without the option) and never carry the Authorization
header (a presigned storage URL must not see the registry's token).

Every failure is an ImageError of one line that names the image and the URL.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmpod.errors import ImageError, KvmpodError
from kvmpod.image.fetch import CHUNK, TIMEOUT
from kvmpod.image.limits import ImportLimits, human_size
from kvmpod.image.registry.auth import Challenge, Credentials, find_credentials, parse_challenges
from kvmpod.image.registry.reference import DockerReference
from kvmpod.image.transfer import Transfer
from kvmpod.progress import Advance
from kvmpod.version import __version__

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
MAX_MANIFEST_BYTES = 4 << 20  # the same cap as the converter's JSON documents
_MAX_ERROR_BODY = 64 << 10


@dataclass(frozen=True)
class Manifest:
    data: bytes          # exactly as served: its digest is over these bytes
    media_type: str
    digest: str

    def json(self, where: str) -> dict[str, Any]:
        try:
            document = json.loads(self.data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImageError(f"{where}: the manifest is not valid JSON: {e}") from e
        if not isinstance(document, dict):
            raise ImageError(f"{where}: the manifest is not a JSON object")
        return document


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows a registry's redirects only where a first request could go (Transfer.check_url)."""

    def __init__(self, transfer: Transfer):
        self.transfer = transfer

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        self.transfer.check_url(newurl, "redirect")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class RegistryClient:
    def __init__(self, ref: DockerReference, transfer: Transfer, limits: ImportLimits,
                 auth_files: list[Path] | None = None):
        self.ref = ref
        self.transfer = transfer
        self.limits = limits
        self._auth_files = auth_files
        self._base: str | None = None           # https://host or http://host, once pinged
        self._authorization: str | None = None  # the header value every request carries
        self._credentials: Credentials | None = None
        self._looked_up = False
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=transfer.ssl_context()),
                                                   _Redirects(transfer))

    # --- the API --------------------------------------------------------------------------------

    def manifest(self, reference: str, expected_size: int | None = None) -> Manifest:
        """The manifest or index `reference` (a tag or digest) names, its digest checked."""
        url = f"{self.base()}/v2/{self.ref.repository}/manifests/{reference}"
        accept = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))
        with self._open(url, accept) as response:
            media_type = (response.headers.get("Content-Type") or "").partition(";")[0].strip()
            header_digest = response.headers.get("Docker-Content-Digest")
            data = self._read_small(response, url, expected_size)
        algorithm = reference.partition(":")[0] if ":" in reference else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if ":" in reference and digest != reference:
            raise ImageError(f"{self.ref}: {url}: digest mismatch (expected {reference}, got {digest})")
        if header_digest and header_digest.startswith(f"{algorithm}:") and header_digest != digest:
            raise ImageError(f"{self.ref}: {url}: the manifest does not have the digest the registry gives "
                             f"(Docker-Content-Digest {header_digest}, got {digest})")
        try:
            body_type = json.loads(data).get("mediaType")
        except (ValueError, AttributeError):
            body_type = None
        media_type = body_type if isinstance(body_type, str) and body_type else media_type
        if media_type.startswith("application/vnd.docker.distribution.manifest.v1"):
            raise ImageError(f"{self.ref}: {url}: a Docker schema 1 manifest, which kvmpod does not read "
                             "(push the image again with a current docker, podman or skopeo)")
        if media_type not in (*INDEX_TYPES, *MANIFEST_TYPES):
            raise ImageError(f"{self.ref}: {url}: media type {media_type or '(none)'!r} is not an image "
                             "manifest or index")
        return Manifest(data, media_type, digest)

    def fetch_blob(self, digest: str, size: int, dest: Path, advance: Advance) -> None:
        """Write the blob to `dest`, hashing the bytes as they arrive; a wrong digest or size, or a
        download cut short, raises (the caller removes `dest`)."""
        url = f"{self.base()}/v2/{self.ref.repository}/blobs/{digest}"
        if size > self.limits.max_size:
            raise ImageError(f"{self.ref}: {url}: {human_size(size)} exceeds the {human_size(self.limits.max_size)} "
                             "image limit ([image] max-size in kvmpod.toml)")
        algorithm, _, expected = digest.partition(":")
        running = hashlib.new(algorithm)
        received = 0
        try:
            with self._open(url) as response, dest.open("wb") as out:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) != size:
                    raise ImageError(f"{self.ref}: {url}: the registry sends {length} bytes, the manifest "
                                     f"says {size}")
                while chunk := response.read(CHUNK):
                    received += len(chunk)
                    if received > size:
                        raise ImageError(f"{self.ref}: {url}: more than the {size} bytes the manifest gives")
                    running.update(chunk)
                    out.write(chunk)
                    advance(len(chunk))
        except (http.client.HTTPException, OSError) as e:
            raise ImageError(f"{self.ref}: {url}: download interrupted after {received} of {size} bytes: "
                             f"{_describe(e)}") from e
        if received != size:
            raise ImageError(f"{self.ref}: {url}: download interrupted after {received} of {size} bytes: "
                             "the connection closed early")
        if running.hexdigest() != expected:
            raise ImageError(f"{self.ref}: {url}: digest mismatch (expected {digest}, "
                             f"got {algorithm}:{running.hexdigest()})")

    # --- scheme and authentication -----------------------------------------------------------------

    def base(self) -> str:
        """https://HOST (or http://HOST with --insecure-options=http and no TLS there), once pinged."""
        if self._base is None:
            self._base = self._ping()
        return self._base

    def _ping(self) -> str:
        host = self.ref.api_host
        url = f"https://{host}/v2/"
        try:
            self._ping_at(url)
            return f"https://{host}"
        except _NoTls as e:
            plain = f"http://{host}/v2/"
            if not self.transfer.insecure.http:
                raise ImageError(f"{self.ref}: {url}: the registry does not answer TLS ({e}); "
                                 "plain http needs --insecure-options=http") from e
            self._ping_at(plain)
            return f"http://{host}"

    def _ping_at(self, url: str) -> None:
        self.transfer.check_url(url, "registry access")
        request = urllib.request.Request(url, headers={"User-Agent": f"kvmpod/{__version__}"})
        try:
            with self._opener.open(request, timeout=TIMEOUT):
                return
        except urllib.error.HTTPError as e:
            with e:
                if e.code == 401:
                    self._authenticate(parse_challenges(e.headers.get_all("WWW-Authenticate") or []), url)
                    return
                raise ImageError(f"{self.ref}: {url}: HTTP {e.code} {e.reason}: not an OCI distribution "
                                 "(Docker registry v2) API") from e
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, ssl.SSLError) and not isinstance(reason, ssl.SSLCertVerificationError):
                raise _NoTls(_describe(reason)) from e
            raise self._network_error(url, e) from e
        except (http.client.HTTPException, OSError) as e:
            if isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLCertVerificationError):
                raise _NoTls(_describe(e)) from e
            raise ImageError(f"{self.ref}: {url}: cannot connect: {_describe(e)}") from e

    def credentials(self) -> Credentials | None:
        if not self._looked_up:
            self._credentials = find_credentials(self.ref, self._auth_files)
            self._looked_up = True
        return self._credentials

    def _authenticate(self, challenges: list[Challenge], url: str) -> None:
        """Answer a 401: a bearer token from the realm, or basic credentials."""
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        credentials = self.credentials()
        if bearer is not None:
            self._authorization = "Bearer " + self._token(bearer, credentials, url)
        elif basic is not None:
            if credentials is None:
                raise ImageError(f"{self.ref}: {url}: the registry wants a user name and password, and no "
                                 f"credentials file has any for {self.ref.host} (podman login, skopeo login, "
                                 "or REGISTRY_AUTH_FILE)")
            self._authorization = credentials.basic()
        else:
            raise ImageError(f"{self.ref}: {url}: HTTP 401 without a Bearer or Basic challenge")

    def _token(self, challenge: Challenge, credentials: Credentials | None, url: str) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise ImageError(f"{self.ref}: {url}: a Bearer challenge without a realm")
        try:
            self.transfer.check_url(realm, "token request")
        except KvmpodError as e:
            raise ImageError(f"{self.ref}: {e}") from e
        if not realm.startswith(("https://", "http://")):
            raise ImageError(f"{self.ref}: {url}: the token realm {realm!r} is not an http(s) URL")
        query = {"scope": challenge.params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if service := challenge.params.get("service"):
            query = {"service": service, **query}
        token_url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        request = urllib.request.Request(token_url, headers={"User-Agent": f"kvmpod/{__version__}"})
        if credentials is not None:
            request.add_unredirected_header("Authorization", credentials.basic())
        try:
            with self._opener.open(request, timeout=TIMEOUT) as response:
                data = self._read_small(response, token_url, None)
        except urllib.error.HTTPError as e:
            with e:
                if e.code == 401 and credentials is not None:
                    why = f"the token server refuses the credentials from {credentials.origin}"
                elif e.code == 401:
                    why = (f"the token server wants credentials and no credentials file has any for "
                           f"{self.ref.host} (podman login, skopeo login, or REGISTRY_AUTH_FILE)")
                else:
                    why = f"HTTP {e.code} {e.reason}"
                raise ImageError(f"{self.ref}: {token_url}: {why}") from e
        except urllib.error.URLError as e:
            raise self._network_error(token_url, e) from e
        except (http.client.HTTPException, OSError) as e:
            raise ImageError(f"{self.ref}: {token_url}: {_describe(e)}") from e
        try:
            answer = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImageError(f"{self.ref}: {token_url}: the token answer is not JSON") from e
        token = (answer.get("token") or answer.get("access_token")) if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise ImageError(f"{self.ref}: {token_url}: the answer has no token")
        return token

    # --- requests ------------------------------------------------------------------------------------

    def _open(self, url: str, accept: str | None = None) -> http.client.HTTPResponse:
        """The response to GET `url`; a 401 is answered once (a token for this scope), then retried."""
        for attempt in (1, 2):
            request = urllib.request.Request(url, headers={"User-Agent": f"kvmpod/{__version__}"})
            if accept:
                request.add_header("Accept", accept)
            if self._authorization:
                request.add_unredirected_header("Authorization", self._authorization)
            try:
                response: http.client.HTTPResponse = self._opener.open(request, timeout=TIMEOUT)
                return response
            except urllib.error.HTTPError as e:
                with e:
                    challenges = parse_challenges(e.headers.get_all("WWW-Authenticate") or [])
                    if e.code == 401 and attempt == 1 and challenges:
                        self._authenticate(challenges, url)
                        continue
                    raise self._http_error(url, e) from e
            except urllib.error.URLError as e:
                raise self._network_error(url, e) from e
            except KvmpodError as e:  # a redirect Transfer refuses
                raise ImageError(f"{self.ref}: {e}") from e
            except (http.client.HTTPException, OSError) as e:
                raise ImageError(f"{self.ref}: {url}: {_describe(e)}") from e
        raise AssertionError("unreachable")

    def _http_error(self, url: str, e: urllib.error.HTTPError) -> ImageError:
        """The registry's own words for a failure (`{"errors": [{"code", "message"}]}`), else the status."""
        try:
            body = json.loads(e.read(_MAX_ERROR_BODY))
            first = body["errors"][0]
            words = str(first.get("message") or first.get("code") or "").strip()
        except Exception:  # not the registry's error document: the status says it
            words = ""
        if e.code == 401:
            credentials = self.credentials()
            words = (f"{words or 'unauthorized'}: credentials from {credentials.origin} not accepted" if credentials
                     else f"{words or 'unauthorized'}: no credentials for {self.ref.host} in any credentials file")
        return ImageError(f"{self.ref}: {words or e.reason} (HTTP {e.code} from {url})")

    def _network_error(self, url: str, e: urllib.error.URLError) -> ImageError:
        reason = e.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            return ImageError(f"{self.ref}: {url}: TLS certificate not trusted ({reason.verify_message}); "
                              "give its CA with --ca-file, or --insecure-options=tls")
        return ImageError(f"{self.ref}: {url}: cannot connect: {_describe(reason)}")

    def _read_small(self, response: http.client.HTTPResponse, url: str, expected_size: int | None) -> bytes:
        try:
            data = response.read(MAX_MANIFEST_BYTES + 1)
        except (http.client.HTTPException, OSError) as e:
            raise ImageError(f"{self.ref}: {url}: {_describe(e)}") from e
        if len(data) > MAX_MANIFEST_BYTES:
            raise ImageError(f"{self.ref}: {url}: more than {human_size(MAX_MANIFEST_BYTES)}: too big for a manifest")
        if expected_size is not None and len(data) != expected_size:
            raise ImageError(f"{self.ref}: {url}: size mismatch: {len(data)} bytes, the index says {expected_size}")
        return data


class _NoTls(Exception):
    """The https ping met something that is not TLS (a plain-http registry)."""


def _describe(e: object) -> str:
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed early"
    if isinstance(e, TimeoutError):
        return f"no data for {TIMEOUT:.0f} s"
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e) if isinstance(e.reason, str) else str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
