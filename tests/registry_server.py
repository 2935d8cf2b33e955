"""A real registry for the `docker://` tests: Debian's docker-registry (the CNCF distribution
registry) on 127.0.0.1, with the buildah-built busybox image pushed into it by skopeo, and a small
proxy in front of it that the tests steer (corrupt or cut a blob, demand a bearer token, count
requests).

    from tests.registry_server import Registry   # the session fixtures come from tests/conftest.py

    def test_x(registry):          # plain http: registry.http_host is 127.0.0.1:PORT
        registry.proxy.requests    # what the proxy was asked, ("GET", "/v2/busybox/blobs/sha256:…")

    def test_y(registry_tls):      # the same storage served over https with the test CA's server
        registry_tls.host, registry_tls.ca_file   # certificate (tests/tls_fixture.py)

The registry's storage is under the session's temp dir; it and the proxy stop with the session.
skopeo runs with a policy and an empty auth file of the test's own; like buildah (tests/oci_images.py)
it still keeps its digest cache in /var/lib/containers/cache/blob-info-cache-v1.boltdb as root.
Debian packages: docker-registry, skopeo (the Makefile's DEB_PACKAGES). Installing docker-registry
also enables a system service on :5000 where systemd runs; the tests start their own on free ports.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from base64 import b64decode
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.tls_fixture import TestCA, tls_ca  # noqa: F401  (the session fixture, for registry_tls)

REGISTRY = Path("/usr/bin/docker-registry")
REPOSITORY = "busybox"
TAG = "latest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ProxyRules:
    """What the proxy does to the next requests; tests set and reset these."""

    corrupt: set[str] = field(default_factory=set)  # blob digests whose body gets one byte flipped
    cut: set[str] = field(default_factory=set)      # blob digests whose body stops half-way (connection closed)
    credentials: tuple[str, str] | None = None      # demand a bearer token, issued for these basic credentials
    redirect: bool = False                          # blobs answer 307 to /direct/… (storage, as S3 would be)
    direct: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization) asked there
    tokens: set[str] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.corrupt.clear()
        self.cut.clear()
        self.credentials = None
        self.redirect = False
        self.direct.clear()
        self.tokens.clear()
        self.requests.clear()

    def blob_gets(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET" and "/blobs/" in path]


class Proxy:
    """A plain-http reverse proxy in front of the registry, on its own port, with a token endpoint."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.rules = ProxyRules()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

            def do_HEAD(self) -> None:
                proxy.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.rules.requests

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        rules = self.rules
        if h.path.startswith("/token"):
            return self._token(h)
        if h.path.startswith("/direct/"):  # the "storage" a blob is redirected to: no token needed
            rules.direct.append((h.path, h.headers.get("Authorization")))
            return self._forward(h, h.path.removeprefix("/direct"))
        rules.requests.append((h.command, h.path))
        if rules.credentials is not None:
            given = h.headers.get("Authorization", "")
            if not given.startswith("Bearer ") or given[7:] not in rules.tokens:
                scope = f"repository:{REPOSITORY}:pull"
                challenge = (f'Bearer realm="http://{self.host}/token",service="kvmpod-test",scope="{scope}"')
                return self._send(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                                  {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        if rules.redirect and "/blobs/" in h.path:
            return self._send(h, 307, b"", {"Location": f"http://{self.host}/direct{h.path}"})
        self._forward(h, h.path)

    def _forward(self, h: BaseHTTPRequestHandler, path: str) -> None:
        rules = self.rules
        upstream = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() in ("accept", "range")}
            upstream.request(h.command, path, headers=headers)
            response = upstream.getresponse()
            body = response.read()
            passed = {k: v for k, v in response.getheaders()
                      if k.lower() in ("content-type", "docker-content-digest", "www-authenticate", "location",
                                       "docker-distribution-api-version")}
            digest = path.rsplit("/", 1)[-1] if "/blobs/" in path else None
            if digest in rules.corrupt and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            if digest in rules.cut and h.command == "GET":
                h.send_response(response.status)
                for k, v in passed.items():
                    h.send_header(k, v)
                h.send_header("Content-Length", str(len(body)))
                h.send_header("Connection", "close")
                h.end_headers()
                h.wfile.write(body[:len(body) // 2])
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            self._send(h, response.status, body, passed, head=h.command == "HEAD",
                       length=response.getheader("Content-Length"))
        finally:
            upstream.close()

    def _token(self, h: BaseHTTPRequestHandler) -> None:
        rules = self.rules
        given = h.headers.get("Authorization", "")
        try:
            user, _, password = b64decode(given.removeprefix("Basic ")).decode().partition(":")
        except ValueError:
            user = password = ""
        if not given.startswith("Basic ") or rules.credentials != (user, password):
            return self._send(h, 401, b'{"details":"bad credentials"}', {"Content-Type": "application/json"})
        token = secrets.token_hex(16)
        rules.tokens.add(token)
        self._send(h, 200, json.dumps({"token": token, "expires_in": 300}).encode(),
                   {"Content-Type": "application/json"})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool = False,
              length: str | None = None) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", length if head and length else str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)


class RegistryProcess:
    """docker-registry serving `root`'s storage on 127.0.0.1:PORT (https with `tls`: (cert, key))."""

    def __init__(self, work: Path, storage: Path, tls: tuple[Path, Path] | None = None,
                 htpasswd: Path | None = None):
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = work / f"registry-{self.port}.log"
        config = work / f"registry-{self.port}.yml"
        lines = ["version: 0.1", "log:", "  level: info", "  accesslog:", "    disabled: false",
                 "storage:", "  filesystem:", f"    rootdirectory: {storage}", "  delete:", "    enabled: true",
                 "http:", f"  addr: {self.host}"]
        if tls:
            lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
        if htpasswd:
            lines += ["auth:", "  htpasswd:", "    realm: kvmpod-test", f"    path: {htpasswd}"]
        config.write_text("\n".join(lines) + "\n")
        self.scheme = "https" if tls else "http"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([str(REGISTRY), "serve", str(config)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)

    def wait_ready(self, context: object = None) -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.scheme}://{self.host}/v2/", timeout=5, context=context):
                    return
            except urllib.error.HTTPError as e:
                if e.code == 401:  # up, and wants credentials
                    return
                time.sleep(0.1)
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"docker-registry did not answer on {self.host}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Registry:
    http_host: str           # the registry itself, plain http
    proxy: Proxy             # plain http, in front of it
    storage: Path
    work: Path
    manifest_digest: str     # what busybox:latest points to (an image manifest)

    @property
    def rules(self) -> ProxyRules:
        return self.proxy.rules


def skopeo_push(source: str, dest: str, work: Path) -> None:
    policy = work / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    auth = work / "skopeo-auth.json"
    auth.write_text('{"auths": {}}')
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(auth), "TMPDIR": str(work)}
    done = subprocess.run(["skopeo", "--policy", str(policy), "copy", "--quiet", "--dest-tls-verify=false",
                           source, dest], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"skopeo copy {source} {dest}: {done.stderr.strip()}")


def manifest_digest(host: str, reference: str) -> str:
    request = urllib.request.Request(f"http://{host}/v2/{REPOSITORY}/manifests/{reference}", method="HEAD", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.headers["Docker-Content-Digest"]


def put_index(host: str, tag: str, entries: list[dict]) -> None:
    """An OCI image index pushed by hand (skopeo pushes the single-platform image it has)."""
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": entries}).encode()
    request = urllib.request.Request(f"http://{host}/v2/{REPOSITORY}/manifests/{tag}", data=body, method="PUT",
                                     headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
    with urllib.request.urlopen(request, timeout=30):
        pass


@pytest.fixture(scope="session")
def registry(tmp_path_factory, busybox_oci_archives):
    if not REGISTRY.is_file():
        pytest.skip(f"{REGISTRY} is missing (Debian package: docker-registry)")
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is missing (Debian package: skopeo)")
    work = tmp_path_factory.mktemp("registry")
    storage = work / "storage"
    server = RegistryProcess(work, storage)
    proxy = None
    try:
        server.wait_ready()
        skopeo_push(f"oci-archive:{busybox_oci_archives.oci_archive}", f"docker://{server.host}/{REPOSITORY}:{TAG}",
                    work)
        proxy = Proxy(server.host)
        yield Registry(server.host, proxy, storage, work, manifest_digest(server.host, TAG))
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


@pytest.fixture
def proxy_rules(registry):
    """The proxy's rules, reset before and after the test."""
    registry.rules.reset()
    yield registry.rules
    registry.rules.reset()


@dataclass(frozen=True)
class TlsRegistry:
    host: str       # 127.0.0.1:PORT, https with a certificate of the test CA
    ca_file: Path


@pytest.fixture(scope="session")
def registry_tls(registry, tls_ca: TestCA):
    """A second docker-registry on the same storage, over https (its own TLS config)."""
    import ssl

    server = RegistryProcess(registry.work, registry.storage, tls=(tls_ca.cert_file, tls_ca.key_file))
    try:
        server.wait_ready(ssl.create_default_context(cafile=str(tls_ca.ca_file)))
        yield TlsRegistry(server.host, tls_ca.ca_file)
    finally:
        server.stop()


BASIC_USER, BASIC_PASSWORD = "kvmpod", "registry-pw"


@pytest.fixture(scope="session")
def registry_basic(registry, tls_ca: TestCA):
    """The same storage behind docker-registry's own htpasswd (basic) authentication, over https."""
    import ssl
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            pytest.skip("the htpasswd file's bcrypt hash is made with Python's crypt module (Python < 3.13)")
    hashed = crypt.crypt(BASIC_PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH))
    if not hashed or not hashed.startswith("$2"):
        pytest.skip("this libc's crypt() makes no bcrypt hashes, the only kind docker-registry's htpasswd reads")
    htpasswd = registry.work / "htpasswd"
    htpasswd.write_text(f"{BASIC_USER}:{hashed}\n")
    server = RegistryProcess(registry.work, registry.storage, tls=(tls_ca.cert_file, tls_ca.key_file),
                             htpasswd=htpasswd)
    try:
        server.wait_ready(ssl.create_default_context(cafile=str(tls_ca.ca_file)))
        yield TlsRegistry(server.host, tls_ca.ca_file)
    finally:
        server.stop()
