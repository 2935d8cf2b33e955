"""Shared test fixtures: an isolated store and runtime dir, the sample busybox image, a kvmpod runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpod.vm import cgroup

# the buildah-built busybox image fixture, and a registry with it pushed in, for unit and e2e tests
pytest_plugins = ["tests.oci_images", "tests.registry_server"]

REPO = Path(__file__).resolve().parent.parent
MAKE_ROOTFS = REPO / "tests" / "make-busybox-rootfs.sh"


@pytest.fixture(scope="session")
def kvmpod_dirs(tmp_path_factory) -> dict[str, str]:
    """Store and pod dirs of the test session only (the kernel cache stays the machine's: make kernel fills it)."""
    base = tmp_path_factory.mktemp("kvmpod")
    # Pods of the tests default to --net none: the product's default for root (the bridge kvmpod0,
    # NAT) would touch this machine's own network. Networking tests pass --net and run inside network
    # namespaces they make. This is the user-level config layer, so a test's KVMPOD_CONFIG adds to it.
    config = base / "config" / "kvmpod" / "kvmpod.toml"
    config.parent.mkdir(parents=True)
    # No appc discovery either: a name missing from the store would be looked up on the network
    # (example.com...); the discovery tests turn it on for their server on 127.0.0.1.
    config.write_text('[net]\ndefault = "none"\n\n[image]\ndiscovery = false\n')
    env = {"KVMPOD_STORE_DIR": str(base / "store"), "KVMPOD_RUN_DIR": str(base / "run"),
           "KVMPOD_AUDIT_LOG": str(base / "audit.log"), "XDG_CONFIG_HOME": str(base / "config"),
           "KVMPOD_SNAPSHOT_DIR": str(base / "snapshots")}
    yield env
    # The session's pods had their cgroups under a parent of this runtime dir's own (kvmpod/vm/cgroup.py
    # parent_name): each pod's went with it (the e2e suite checks after every test), the parent goes now.
    parent = cgroup.parent_name(Path(env["KVMPOD_RUN_DIR"]))
    cgroup.sweep(lambda leaf: False, parent=parent)
    root = Path("/sys/fs/cgroup")   # v1 hierarchies and a hybrid host's unified tree, or a v2-only root
    left = [str(d) for d in [*root.glob(f"*/{parent}"), root / parent] if d.is_dir()]
    assert left == [], f"the test session's cgroups outlived it: {left}"


@pytest.fixture(autouse=True)
def no_discovery_on_the_network(monkeypatch, tmp_path_factory) -> None:
    """`[image] discovery = false` unless a test gives its own KVMPOD_CONFIG: a name missing from a test's
    store must not be looked up on the Internet (tests stay on 127.0.0.1; tests/discovery_server.py's
    config turns discovery on for its server)."""
    config = tmp_path_factory.getbasetemp() / "no-discovery.toml"
    if not config.exists():
        config.write_text("[image]\ndiscovery = false\n")
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))


@pytest.fixture(autouse=True)
def no_machine_trust_store(monkeypatch, tmp_path_factory) -> None:
    """No test sees this machine's trust store (/etc/kvmpod/trust, kvmpod/image/trust.py): its keys would
    put the signature policy on images the test did not sign. Tests of the policy make their own."""
    monkeypatch.setenv("KVMPOD_TRUST_DIR", str(tmp_path_factory.getbasetemp() / "no-trust-store"))


@pytest.fixture
def kvmpod_env(kvmpod_dirs, monkeypatch) -> dict[str, str]:
    for k, v in kvmpod_dirs.items():
        monkeypatch.setenv(k, v)
    return {**os.environ, **kvmpod_dirs}


def kvmpod_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmpod", *args]


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rootfs") / "busybox"
    subprocess.run(["sh", str(MAKE_ROOTFS), str(root)], check=True)
    return root


@pytest.fixture(scope="session")
def busybox_aci(busybox_rootfs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images") / "busybox.aci"
    subprocess.run(kvmpod_cmd("image", "build", "--rootfs", str(busybox_rootfs), "--name", "example.com/busybox",
                              "--exec", "/bin/sh -c 'cat /etc/greeting'", "--env", "IMAGE_VAR=from-image",
                              "-o", str(out)), check=True)
    return out
