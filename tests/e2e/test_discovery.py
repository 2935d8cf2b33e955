"""`kvmpod run NAME:VERSION` of an image that is not in the store: found by appc discovery on an https
server on 127.0.0.1 (tests/discovery_server.py), its signature checked against the key trusted for the
prefix, then booted. The refusals are tested without a VM in tests/unit/test_discovery.py."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import kvmpod_cmd
from tests.discovery_server import discovery_server  # noqa: F401 (fixture)
from tests.e2e.conftest import Kvmpod
from tests.tls_fixture import tls_ca  # noqa: F401 (fixture)

NAME = "127.0.0.1/pub/busybox"


def test_run_a_discovered_signed_image(kvmpod_env, busybox_rootfs, discovery_server, tls_ca, tmp_path):
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg_env = {**os.environ, "GNUPGHOME": str(home)}

    def gpg(*args: str) -> bytes:
        return subprocess.run(["gpg", "--batch", "--quiet", *args], env=gpg_env, check=True,
                              capture_output=True).stdout

    gpg("--passphrase", "", "--quick-gen-key", "publisher@kvmpod.test", "ed25519", "sign", "never")
    try:
        run_discovered(gpg, kvmpod_env, busybox_rootfs, discovery_server, tls_ca, tmp_path)
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=gpg_env, check=False)  # the agent signing started


def run_discovered(gpg, kvmpod_env, busybox_rootfs, discovery_server, tls_ca, tmp_path) -> None:
    key = tmp_path / "publisher.asc"
    key.write_bytes(gpg("--armor", "--export", "publisher@kvmpod.test"))
    config = tmp_path / "kvmpod.toml"
    config.write_text(discovery_server.config_text())
    env = {**kvmpod_env, "KVMPOD_CONFIG": str(config), "KVMPOD_TRUST_DIR": str(tmp_path / "trust")}

    def kvmpod(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(kvmpod_cmd(*args), env=env, capture_output=True, text=True)

    aci = tmp_path / "busybox-1.0-linux-amd64.aci"
    built = kvmpod("image", "build", "--rootfs", str(busybox_rootfs), "--name", NAME, "--label", "version=1.0",
                   "--exec", "/bin/echo discovered and verified", "-o", str(aci))
    assert built.returncode == 0, built.stderr
    gpg("--local-user", "publisher@kvmpod.test", "--armor", "--detach-sign", "--output", f"{aci}.asc", str(aci))
    base = discovery_server.base
    discovery_server.pages["/pub?ac-discovery=1"] = discovery_server.meta_page(
        ("ac-discovery", "127.0.0.1/pub", f"{base}/aci/{{os}}/{{arch}}/{{name}}-{{version}}.{{ext}}"),
        ("ac-discovery-pubkeys", "127.0.0.1/pub", f"{base}/keys.asc"))
    discovery_server.pages[f"/aci/linux/amd64/{NAME}-1.0.aci"] = aci.read_bytes()
    discovery_server.pages[f"/aci/linux/amd64/{NAME}-1.0.aci.asc"] = (tmp_path / f"{aci.name}.asc").read_bytes()
    discovery_server.pages["/keys.asc"] = key.read_bytes()

    trusted = kvmpod("trust", "--prefix", "127.0.0.1/pub", "--skip-fingerprint-review", "--ca-file",
                     str(tls_ca.ca_file))
    assert trusted.returncode == 0, trusted.stderr
    result = Kvmpod(env).run("--ca-file", str(tls_ca.ca_file), f"{NAME}:1.0")
    assert (result.returncode, result.stdout) == (0, b"discovered and verified\n"), result.stderr
    listing = kvmpod("image", "list", "--no-legend")
    [line] = [row for row in listing.stdout.splitlines() if NAME in row]
    assert " verified " in f" {line} "
    assert f"/aci/linux/amd64/{NAME}-1.0.aci" in discovery_server.requests
    discovery_server.pages.clear()  # now in the store: it runs again without the server
    again = Kvmpod(env).run(f"{NAME}:1.0")
    assert (again.returncode, again.stdout) == (0, b"discovered and verified\n"), again.stderr
