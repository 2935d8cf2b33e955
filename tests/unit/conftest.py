"""Fixtures the pod-registry and control tests share: a private runtime dir and stand-in processes."""

from __future__ import annotations

import subprocess
import sys

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
