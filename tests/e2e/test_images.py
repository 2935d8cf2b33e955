"""Running images from the store (by name, by ID), converted Docker/OCI images, and rm during a run."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import the_error
from tests.oci_images import GREETING, GREETING_LINE, IMAGE


def fetch(env, source: str) -> str:
    result = subprocess.run(kvmpod_cmd("fetch", source), capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_run_by_store_name_and_by_id(kvmpod, kvmpod_env, busybox_aci):
    image_id = fetch(kvmpod_env, str(busybox_aci))
    for ref in ("example.com/busybox", "example.com/busybox,os=linux", image_id, image_id[:7 + 64]):
        result = kvmpod.run(ref)
        assert (result.returncode, result.stdout) == (0, b"Hello from a kvmpod VM!\n"), (ref, result.stderr)
    missing = kvmpod.run("example.com/busybox:9.9")
    assert missing.returncode == 125
    # (appc discovery would look the name up on the network: the test session turns it off)
    assert the_error(missing) == ("kvmpod: error: example.com/busybox,version=9.9: no such image in the store "
                                  "(`kvmpod image list` shows what is there)")


def test_an_image_in_use_cannot_be_removed(kvmpod, kvmpod_env, busybox_aci):
    image_id = fetch(kvmpod_env, str(busybox_aci))
    proc = kvmpod.popen(image_id, "--exec", "/bin/sh", "--", "-c", "sleep 600")
    try:
        kvmpod.wait_for_running_pod(proc)
        rm = subprocess.run(kvmpod_cmd("image", "rm", image_id), capture_output=True, text=True, env=kvmpod_env)
        assert rm.returncode == 125 and rm.stderr == f"kvmpod: error: {image_id}: in use by a running pod\n"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    rm = subprocess.run(kvmpod_cmd("image", "rm", image_id), capture_output=True, text=True, env=kvmpod_env)
    assert rm.returncode == 0, rm.stderr


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive"])
def test_run_a_docker_image_built_by_a_real_tool(kvmpod, kvmpod_env, kind, busybox_oci_archives):
    archive = busybox_oci_archives.docker_archive if kind == "docker-archive" else busybox_oci_archives.oci_archive
    result = kvmpod.run(f"{kind}:{archive}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"{GREETING_LINE}\n{GREETING}"
    result = kvmpod.run(f"{kind}:{archive}", "--", "id -u; id -g; test -e /etc/obsolete || echo whited out; exit 3")
    assert (result.returncode, result.stdout) == (3, b"1000\n1000\nwhited out\n"), result.stderr
    # converted once: the store holds it under its name from the repo tag
    listing = subprocess.run(kvmpod_cmd("image", "list", "--json"), capture_output=True, text=True, env=kvmpod_env)
    assert any(entry["name"] == IMAGE.rsplit(":", 1)[0] and entry["labels"].get("version") == "1.0"
               for entry in json.loads(listing.stdout)), listing.stdout
