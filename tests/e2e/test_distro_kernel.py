"""Smoke set on the Debian cloud kernel (the fallback: modules loaded from the initrd, pc + virtio-pci).

The rest of the suite runs on the default kernel (kvmpod's minimal one once built).
"""

from __future__ import annotations

import hashlib

import pytest

from kvmpod.boot.kernel import cached_kernels
from tests.e2e.conftest import stderr_lines, the_error

pytestmark = pytest.mark.skipif(not any(k.kind == "distro" for k in cached_kernels()),
                                reason="no distro kernel in the cache: run `make kernel-distro`")
DISTRO = ("--kernel", "distro")


def test_issue_example_on_the_distro_kernel(kvmpod, busybox_aci):
    result = kvmpod.run(*DISTRO, str(busybox_aci), "--exec", "/bin/sh", "--", "-c",
                        "echo hello; echo oops >&2; exit 7")
    assert (result.returncode, result.stdout, stderr_lines(result)) == (7, b"hello\n", ["oops"])


def test_output_and_users_on_the_distro_kernel(kvmpod, busybox_aci):
    result = kvmpod.run(*DISTRO, str(busybox_aci), "--user", "app", "--group", "app", "--exec", "/bin/sh", "--",
                        "-c", "id; head -c 1048576 /dev/zero | sha256sum")
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "uid=1000(app) gid=1000(app)"
    assert lines[1].split()[0] == hashlib.sha256(bytes(1 << 20)).hexdigest()


def test_panic_is_reported_on_the_distro_kernel(kvmpod, busybox_aci):
    result = kvmpod.run(*DISTRO, str(busybox_aci), "--exec", "/bin/sh", "--", "-c", "echo c > /proc/sysrq-trigger")
    assert result.returncode == 125 and "kernel panicked" in the_error(result)


def test_user_networking_on_the_distro_kernel(kvmpod, busybox_aci):
    """virtio_net is a module there: the agent loads it before it configures eth0."""
    result = kvmpod.run(*DISTRO, "--net", "user", str(busybox_aci), "--exec", "/bin/sh", "--", "-c",
                        "ip -4 -o addr show eth0; ip route show default")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "inet 10.0.2.15/24" in out and "default via 10.0.2.2" in out
