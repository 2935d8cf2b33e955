"""Fixtures the unit tests share: a private runtime dir, stand-in processes, an http root, and the
guest agent's C tests, built and run once."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def sleeper(argv0: str) -> subprocess.Popen:
    """A process whose /proc cmdline starts with `argv0` (a stand-in for kvmpod or QEMU)."""
    return subprocess.Popen([argv0, "-c", "import time; time.sleep(60)"], executable=sys.executable)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPOD_RUN_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def owner():
    """A live process whose command line says kvmpod, like a running `kvmpod run`."""
    proc = sleeper("kvmpod run image.aci")
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def http_root(tmp_path):
    """A directory served over http on 127.0.0.1 for the test: (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def agent_c_tests(tmp_path_factory) -> subprocess.CompletedProcess:
    """`make -C guest-agent test` in a scratch build dir, once per session: the agent's C tests (metadata
    service, golden frames, ...) print a line each, which the tests of each part look for."""
    if not (shutil.which("musl-gcc") or shutil.which("gcc")) or not shutil.which("make"):
        pytest.skip("no C toolchain")
    build = tmp_path_factory.mktemp("agent-build")
    result = subprocess.run(["make", "-s", "-C", str(REPO / "guest-agent"), "test", f"BUILD={build}",
                             f"PYTHON={sys.executable}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result
