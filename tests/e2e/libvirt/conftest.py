"""A real libvirt daemon for the libvirt backend's tests (docs/libvirt.md; started and stopped by
tests/e2e/libvirtd.py, for this directory's tests only), and the `backend` parameter that runs the core
e2e set on both backends.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import kvmpod_cmd
from tests.e2e import libvirtd
from tests.e2e.conftest import VM_TIMEOUT, Kvmpod
from tests.e2e.libvirtd import domains, virsh

__all__ = ["BackendKvmpod", "domains", "virsh"]


@pytest.fixture(scope="package")
def kvmpod_dirs():
    """As tests/conftest.py's, in a directory libvirt's QEMU user can pass through."""
    with libvirtd.kvmpod_dirs() as env:
        yield env


@pytest.fixture(scope="package")   # the daemon stops after this directory's tests, not at the session's end
def libvirt_uri():
    if libvirtd.WHY_NOT:
        pytest.skip(libvirtd.WHY_NOT)
    with libvirtd.libvirt_daemon() as uri:
        yield uri


@pytest.fixture(autouse=True)
def no_domain_left(request):
    """After every test here that used libvirt: no domain of kvmpod's (libvirt may take a moment to
    report a destroyed transient domain gone)."""
    yield
    callspec = getattr(request.node, "callspec", None)
    on_libvirt = callspec is not None and callspec.params.get("backend") == "libvirt"
    if "libvirt_uri" not in request.fixturenames and not on_libvirt:
        return
    assert libvirtd.wait_no_domain(request.getfixturevalue("libvirt_uri")) == [], "a libvirt domain outlived its pod"


class BackendKvmpod(Kvmpod):
    """`kvmpod run` on one backend: the libvirt one gets --backend libvirt --libvirt-uri."""

    def __init__(self, env: dict[str, str], backend_args: list[str]):
        super().__init__(env)
        self.backend_args = backend_args

    def run(self, *args: str, input: bytes | None = None, timeout: float = VM_TIMEOUT) -> subprocess.CompletedProcess:
        return super().run(*self.backend_args, *args, input=input, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return super().popen(*self.backend_args, *args)

    def cmd(self, *args: str, input: bytes | None = None, timeout: float = VM_TIMEOUT) -> subprocess.CompletedProcess:
        """Any kvmpod command (run gets the backend's flags)."""
        if args and args[0] == "run":
            args = ("run", *self.backend_args, *args[1:])
        return subprocess.run(kvmpod_cmd(*args), input=input, capture_output=True, env=self.env, timeout=timeout)

    def detach(self, *run_args: str) -> str:
        result = self.cmd("run", "--detach", *run_args)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode().strip()


@pytest.fixture(params=["qemu", "libvirt"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def pod_runner(request, backend, kvmpod_env) -> BackendKvmpod:
    if backend == "libvirt":
        uri = request.getfixturevalue("libvirt_uri")
        return BackendKvmpod(kvmpod_env, ["--backend", "libvirt", "--libvirt-uri", uri])
    return BackendKvmpod(kvmpod_env, [])
