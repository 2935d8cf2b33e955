"""kvmpod's bridge (--net default) on the libvirt backend (docs/libvirt.md): a libvirtd of the tests' own
inside a network namespace they made, and kvmpod run in the same namespace — libvirtd opens the pod's
tap by name in its own namespace, and no packet of these tests touches the machine's. The daemon is
this package's (tests/e2e/libvirtd.py): tests/e2e/libvirt/'s has stopped before it starts.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e import libvirtd
from tests.e2e.test_net import Netns


@pytest.fixture(scope="package")
def kvmpod_dirs():
    with libvirtd.kvmpod_dirs() as env:
        yield env


@pytest.fixture(scope="package")
def netns(kvmpod_dirs):
    """The namespace of the daemon and of every kvmpod command here."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    ns = Netns({**os.environ, **kvmpod_dirs})
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture(scope="package")
def libvirt_uri(netns):
    if libvirtd.WHY_NOT:
        pytest.skip(libvirtd.WHY_NOT)
    if libvirtd.answers(libvirtd.SYSTEM_URI):
        pytest.skip("the machine's libvirtd runs: a second one, in the test's network namespace, would share "
                    "its /run/libvirt state")
    with libvirtd.libvirt_daemon(netns=netns.name) as uri:
        yield uri


@pytest.fixture(autouse=True)
def nothing_left(request):
    """After every test: no domain of kvmpod's, and no tap, bridge port, port forward or lease."""
    yield
    if "libvirt_uri" not in request.fixturenames:
        return
    assert libvirtd.wait_no_domain(request.getfixturevalue("libvirt_uri")) == [], "a libvirt domain outlived its pod"
    assert request.getfixturevalue("netns").leftovers() == [], "a pod left network state behind"
