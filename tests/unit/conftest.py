"""Fixtures the pod-registry and control tests share: a private runtime dir and stand-in processes."""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading

import pytest


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
