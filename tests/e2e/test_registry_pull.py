"""`kvmpod run docker://…` against a real registry (Debian's docker-registry on 127.0.0.1 with the
buildah busybox image pushed by skopeo, tests/registry_server.py): over plain http with
--insecure-options=http, and over https verified with the test CA."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import kvmpod_cmd
from tests.registry_server import REPOSITORY


def test_run_an_image_pulled_over_plain_http(kvmpod, kvmpod_env, registry):
    ref = f"docker://{registry.http_host}/{REPOSITORY}:latest"
    result = kvmpod.run("--insecure-options=http", ref, "--exec", "/bin/echo", "--", "hi")
    assert (result.returncode, result.stdout) == (0, b"hi\n"), result.stderr
    listing = subprocess.run(kvmpod_cmd("image", "list", "--json"), capture_output=True, text=True, env=kvmpod_env)
    assert any(entry["source"] == f"{ref}@{registry.manifest_digest}" for entry in json.loads(listing.stdout))


def test_run_an_image_pulled_over_https_with_the_ca_file(kvmpod, registry_tls):
    ref = f"docker://{registry_tls.host}/{REPOSITORY}:latest"
    result = kvmpod.run("--ca-file", str(registry_tls.ca_file), ref, "--exec", "/bin/echo", "--", "hi")
    assert (result.returncode, result.stdout) == (0, b"hi\n"), result.stderr
