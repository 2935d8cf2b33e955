"""An appc discovery server for tests: https on 127.0.0.1 with the test CA (tests/tls_fixture.py),
serving whatever the test puts in `pages` (path with query -> body), 404 for the rest.

kvmpod reaches it under image names that start with 127.0.0.1 (an AC Name), through the host port
table of kvmpod.toml (`[image] discovery-ports = { "127.0.0.1" = PORT }`), which `config_text` gives
(with `discovery = true`: the test session turns discovery off, tests/conftest.py).
A body wrapped in `Cut` is announced whole and cut off halfway: an interrupted download; a
`Redirect` answers 302 with its location.
"""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tls_fixture import TestCA


@dataclass(frozen=True)
class Cut:
    body: bytes


@dataclass(frozen=True)
class Redirect:
    location: str       # answered with 302 Found and this Location


@dataclass
class DiscoveryServer:
    port: int
    pages: dict[str, bytes | Cut | Redirect] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        return f'[image]\ndiscovery = true\ndiscovery-ports = {{ "127.0.0.1" = {self.port} }}\n'

    def meta_page(self, *tags: tuple[str, str, str]) -> bytes:
        """An HTML page with `<meta name=NAME content="PREFIX URL">` for each (NAME, PREFIX, URL)."""
        metas = "\n".join(f'    <meta name="{n}" content="{p} {u}">' for n, p, u in tags)
        return f"<!DOCTYPE html>\n<html lang=\"en\">\n  <head>\n    <meta charset=\"utf-8\">\n{metas}\n  </head>\n" \
               f"<body>appc discovery</body></html>\n".encode()

    def serve_file(self, path: str, file: Path) -> str:
        self.pages[path] = file.read_bytes()
        return self.base + path


def start(ca: TestCA) -> tuple[DiscoveryServer, http.server.ThreadingHTTPServer]:
    state = DiscoveryServer(0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's spelling)
            state.requests.append(self.path)
            body = state.pages.get(self.path)
            if body is None:
                self.send_error(404)
                return
            if isinstance(body, Redirect):
                self.send_response(302)
                self.send_header("Location", body.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            whole = body.body if isinstance(body, Cut) else body
            self.send_response(200)
            self.send_header("Content-Length", str(len(whole)))
            self.send_header("Content-Type", "text/html" if "ac-discovery" in self.path else "application/octet-stream")
            self.end_headers()
            self.wfile.write(whole[:len(whole) // 2] if isinstance(body, Cut) else whole)
            if isinstance(body, Cut):
                self.wfile.flush()
                self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = ca.server_context().wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return state, server


@pytest.fixture
def discovery_server(tls_ca):
    state, server = start(tls_ca)
    yield state
    server.shutdown()
    server.server_close()
