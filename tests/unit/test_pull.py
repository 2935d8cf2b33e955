"""`docker://` pulls: references, credentials and challenges parsed, then real pulls from Debian's
docker-registry on 127.0.0.1 (tests/registry_server.py) through `kvmpod fetch`, with a test proxy
in front that corrupts or cuts a blob, demands a bearer token, and counts what is asked for."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpod.errors import ImageError, UsageError
from kvmpod.image.registry.auth import find_credentials, parse_challenges
from kvmpod.image.registry.reference import DockerReference, parse_docker_reference
from kvmpod.store.refs import DockerRef, parse_image_ref
from tests.registry_server import BASIC_PASSWORD, BASIC_USER, REPOSITORY, put_index


# --- references -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, host, repository, tag, digest", [
    ("docker://busybox", "docker.io", "library/busybox", "latest", None),
    ("docker://busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("docker://docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
    ("docker://index.docker.io/me/app:v2", "docker.io", "me/app", "v2", None),
    ("docker://me/app", "docker.io", "me/app", "latest", None),
    ("docker://127.0.0.1:5000/busybox", "127.0.0.1:5000", "busybox", "latest", None),
    ("docker://localhost/a/b/c:x_1.2-3", "localhost", "a/b/c", "x_1.2-3", None),
    ("docker://quay.io/team/app@sha256:" + "a" * 64, "quay.io", "team/app", None, "sha256:" + "a" * 64),
    ("docker://quay.io/team/app:v1@sha256:" + "b" * 64, "quay.io", "team/app", "v1", "sha256:" + "b" * 64),
])
def test_references_are_normalised_as_docker_does(text, host, repository, tag, digest):
    ref = parse_docker_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)
    assert parse_image_ref(text) == DockerRef(ref)


def test_docker_hub_is_reached_at_its_api_host():
    ref = parse_docker_reference("docker://busybox")
    assert (ref.api_host, str(ref)) == ("registry-1.docker.io", "docker://docker.io/library/busybox:latest")
    assert parse_docker_reference("docker://127.0.0.1:5000/x").api_host == "127.0.0.1:5000"
    assert ref.resolved("sha256:" + "c" * 64) == "docker://docker.io/library/busybox:latest@sha256:" + "c" * 64


@pytest.mark.parametrize("text, problem", [
    ("docker://", "no image after docker://"),
    ("docker://Busybox", "'library/Busybox' is not a repository name"),
    ("docker://a//b", "is not a repository name"),
    ("docker://busybox:", "'' is not a tag"),
    ("docker://busybox:-x", "'-x' is not a tag"),
    ("docker://busybox@sha256:abc", "'sha256:abc' is not a digest"),
    ("docker://bad_host.x:99/app", "'bad_host.x:99' is not a registry host[:port]"),
    ("docker://127.0.0.1:5000/", "'' is not a repository name"),
])
def test_malformed_references_are_refused_in_one_line(text, problem):
    with pytest.raises(UsageError) as e:
        parse_docker_reference(text)
    assert str(e.value).startswith(f"{text}: ") and problem in str(e.value) and "\n" not in str(e.value)


# --- credentials and challenges --------------------------------------------------------------------

def auth_file(path: Path, auths: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {k: {"auth": base64.b64encode(v.encode()).decode()}
                                          for k, v in auths.items()}}))
    return path


def test_credentials_come_from_the_first_file_with_an_entry_and_the_longest_key(tmp_path):
    ref = parse_docker_reference("docker://registry.example.com/team/app:1")
    first = auth_file(tmp_path / "a.json", {"other.example.com": "x:y"})
    second = auth_file(tmp_path / "b.json", {"registry.example.com": "host:pw",
                                            "registry.example.com/team": "team:pw2"})
    third = auth_file(tmp_path / "c.json", {"registry.example.com/team/app": "never:seen"})
    found = find_credentials(ref, [tmp_path / "missing.json", first, second, third])
    assert found is not None and (found.username, found.password, found.origin) == ("team", "pw2", second)
    assert find_credentials(parse_docker_reference("docker://nowhere.example.com/x"), [first, second]) is None


def test_dockers_legacy_hub_key_and_the_usual_file_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    auth_file(tmp_path / "docker" / "config.json", {"https://index.docker.io/v1/": "hubuser:hubpw"})
    found = find_credentials(parse_docker_reference("docker://busybox"))
    assert found is not None and (found.username, found.password) == ("hubuser", "hubpw")
    auth_file(tmp_path / "config" / "containers" / "auth.json", {"docker.io": "podman:pw"})
    assert find_credentials(parse_docker_reference("docker://busybox")).username == "podman"
    auth_file(tmp_path / "run" / "containers" / "auth.json", {"docker.io": "runtime:pw"})
    assert find_credentials(parse_docker_reference("docker://busybox")).username == "runtime"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(tmp_path / "explicit.json", {"docker.io": "explicit:pw"})))
    assert find_credentials(parse_docker_reference("docker://busybox")).username == "explicit"


def test_a_broken_credentials_file_is_one_line_naming_it(tmp_path):
    ref = parse_docker_reference("docker://registry.example.com/app")
    bad = tmp_path / "auth.json"
    bad.write_text("{not json")
    with pytest.raises(ImageError, match=f"^{bad}: registry credentials file is not valid JSON"):
        find_credentials(ref, [bad])
    bad.write_text(json.dumps({"auths": {"registry.example.com": {"auth": "bm9jb2xvbg=="}}}))  # "nocolon"
    with pytest.raises(ImageError, match="auth is not base64 of user:password"):
        find_credentials(ref, [bad])


def test_challenges_keep_commas_inside_quotes():
    [bearer, basic] = parse_challenges([
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push"', 'Basic realm="Registry Realm"'])
    assert (bearer.scheme, bearer.params) == ("bearer", {"realm": "https://auth.example.com/token",
                                                         "service": "registry.example.com",
                                                         "scope": "repository:a/b:pull,push"})
    assert (basic.scheme, basic.params) == ("basic", {"realm": "Registry Realm"})


# --- pulls from a real registry ---------------------------------------------------------------------

class Kvmpod:
    def __init__(self, store: Path, env: dict[str, str]):
        self.store, self.env = store, env

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kvmpod", "--dir", str(self.store), *args],
                              capture_output=True, text=True, env=self.env, timeout=300)

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def records(self) -> list[dict]:
        return json.loads(self.ok("image", "list", "--json"))

    def cached_blobs(self) -> list[str]:
        layers = self.store / "layers"
        return sorted(f"{a.name}:{b.name}" for a in layers.iterdir() for b in a.iterdir()) if layers.is_dir() else []

    def assert_nothing_stored(self) -> None:
        assert self.records() == []
        assert self.cached_blobs() == []
        assert list((self.store / "tmp").iterdir()) == [], "a pull left something in tmp/"


@pytest.fixture
def kvmpod(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KVMPOD_STORE_DIR"}
    env["REGISTRY_AUTH_FILE"] = str(tmp_path / "no-auth.json")  # never this machine's credentials
    env["KVMPOD_CONFIG"] = str(tmp_path / "kvmpod.toml")
    return Kvmpod(tmp_path / "store", env)


def one_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 125, done
    lines = [line for line in done.stderr.splitlines() if not line.startswith("kvmpod: notice:")]
    assert len(lines) == 1 and lines[0].startswith("kvmpod: error: "), done.stderr
    return lines[0].removeprefix("kvmpod: error: ")


def test_a_pull_over_plain_http_stores_the_converted_image_and_its_blobs(kvmpod, registry, proxy_rules):
    ref = f"docker://{registry.proxy.host}/{REPOSITORY}:latest"
    image_id = kvmpod.ok("fetch", "--insecure-options=http", ref).strip()
    [record] = kvmpod.records()
    host_name = registry.proxy.host.replace(":", "-")
    assert (record["id"], record["name"], record["labels"]["version"]) == (image_id, f"{host_name}/busybox", "latest")
    assert record["source"] == f"{ref}@{registry.manifest_digest}"
    manifest = json.loads(kvmpod.ok("image", "cat-manifest", image_id))
    annotations = {a["name"]: a["value"] for a in manifest["annotations"]}
    assert annotations["appc.io/docker/manifesthash"] == registry.manifest_digest
    assert annotations["appc.io/docker/originalname"] == ref.removeprefix("docker://")
    # manifest, config and both layers, content-addressed; each blob asked for once
    assert len(kvmpod.cached_blobs()) == 4 and registry.manifest_digest in kvmpod.cached_blobs()
    assert len(proxy_rules.blob_gets()) == 3
    assert list((kvmpod.store / "tmp").iterdir()) == []
    assert kvmpod("image", "fsck").stdout == ""  # the layer cache is part of a sound store

    # again by tag: the manifest is asked for, no blob; the same image
    proxy_rules.requests.clear()
    assert kvmpod.ok("fetch", "--insecure-options=http", ref).strip() == image_id
    assert proxy_rules.blob_gets() == []
    assert ("GET", f"/v2/{REPOSITORY}/manifests/latest") in proxy_rules.requests

    # by digest: a different reference (its own source and version), still no blob downloaded
    proxy_rules.requests.clear()
    by_digest = kvmpod.ok("fetch", "--insecure-options=http",
                          f"docker://{registry.proxy.host}/{REPOSITORY}@{registry.manifest_digest}").strip()
    assert by_digest != image_id and proxy_rules.blob_gets() == []
    versions = {r["labels"]["version"] for r in kvmpod.records()}
    assert versions == {"latest", registry.manifest_digest.replace(":", "-")}

    # the cache lives while an image needs it; the last image's rm takes it away
    kvmpod.ok("image", "rm", image_id)
    assert len(kvmpod.cached_blobs()) == 4
    kvmpod.ok("image", "rm", by_digest)
    assert kvmpod.cached_blobs() == []


def test_an_index_resolves_to_its_linux_amd64_manifest(kvmpod, registry, proxy_rules):
    size = len(subprocess.run(["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
                               f"http://{registry.http_host}/v2/{REPOSITORY}/manifests/{registry.manifest_digest}"],
                              capture_output=True, check=True).stdout)
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": registry.manifest_digest,
             "size": size}
    put_index(registry.http_host, "multi", [{**entry, "platform": {"os": "linux", "architecture": "arm64"}},
                                            {**entry, "platform": {"os": "linux", "architecture": "amd64"}}])
    put_index(registry.http_host, "armonly", [{**entry, "platform": {"os": "linux", "architecture": "arm64"}}])
    ref = f"docker://{registry.http_host}/{REPOSITORY}:multi"
    kvmpod.ok("fetch", "--insecure-options=http", ref)
    [record] = kvmpod.records()
    assert record["source"].startswith(f"{ref}@sha256:") and registry.manifest_digest not in record["source"]
    error = one_error(kvmpod("fetch", "--insecure-options=http", f"docker://{registry.http_host}/{REPOSITORY}:armonly"))
    assert "no linux/amd64 image in this index (platforms: linux/arm64)" in error


def test_a_corrupted_layer_is_refused_and_nothing_is_stored(kvmpod, registry, proxy_rules):
    layers = json.loads(subprocess.run(
        ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
         f"http://{registry.http_host}/v2/{REPOSITORY}/manifests/latest"], capture_output=True, check=True).stdout)
    digest = layers["layers"][-1]["digest"]
    proxy_rules.corrupt.add(digest)
    ref = f"docker://{registry.proxy.host}/{REPOSITORY}:latest"
    error = one_error(kvmpod("fetch", "--insecure-options=http", ref))
    assert error.startswith(f"{ref}: http://{registry.proxy.host}/v2/{REPOSITORY}/blobs/{digest}: digest mismatch "
                            f"(expected {digest}, got sha256:")
    kvmpod.assert_nothing_stored()


def test_an_interrupted_download_is_a_clean_error(kvmpod, registry, proxy_rules):
    layers = json.loads(subprocess.run(
        ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
         f"http://{registry.http_host}/v2/{REPOSITORY}/manifests/latest"], capture_output=True, check=True).stdout)
    biggest = max(layers["layers"], key=lambda d: d["size"])
    proxy_rules.cut.add(biggest["digest"])
    ref = f"docker://{registry.proxy.host}/{REPOSITORY}:latest"
    error = one_error(kvmpod("fetch", "--insecure-options=http", ref))
    assert error.startswith(f"{ref}: http://{registry.proxy.host}/v2/{REPOSITORY}/blobs/{biggest['digest']}: "
                            f"download interrupted after ")
    kvmpod.assert_nothing_stored()


def test_plain_http_needs_the_insecure_option(kvmpod, registry):
    ref = f"docker://{registry.http_host}/{REPOSITORY}:latest"
    error = one_error(kvmpod("fetch", ref))
    assert error.startswith(f"{ref}: https://{registry.http_host}/v2/: the registry does not answer TLS (")
    assert error.endswith("plain http needs --insecure-options=http")
    kvmpod.assert_nothing_stored()


def test_an_unknown_tag_is_the_registrys_own_words(kvmpod, registry):
    ref = f"docker://{registry.http_host}/{REPOSITORY}:nosuchtag"
    error = one_error(kvmpod("fetch", "--insecure-options=http", ref))
    assert error == (f"{ref}: manifest unknown (HTTP 404 from "
                     f"http://{registry.http_host}/v2/{REPOSITORY}/manifests/nosuchtag)")
    kvmpod.assert_nothing_stored()


def test_a_bearer_token_is_fetched_with_the_credentials_of_auth_json(kvmpod, registry, proxy_rules, tmp_path):
    proxy_rules.credentials = ("tester", "s3cret")
    ref = f"docker://{registry.proxy.host}/{REPOSITORY}:latest"

    error = one_error(kvmpod("fetch", "--insecure-options=http", ref))
    assert error == (f"{ref}: http://{registry.proxy.host}/token?service=kvmpod-test&scope=repository%3A"
                     f"{REPOSITORY}%3Apull: the token server wants credentials and no credentials file has any for "
                     f"{registry.proxy.host} (podman login, skopeo login, or REGISTRY_AUTH_FILE)")

    auth_file(Path(kvmpod.env["REGISTRY_AUTH_FILE"]), {registry.proxy.host: "tester:wrong"})
    error = one_error(kvmpod("fetch", "--insecure-options=http", ref))
    assert error.endswith(f"the token server refuses the credentials from {kvmpod.env['REGISTRY_AUTH_FILE']}")
    kvmpod.assert_nothing_stored()

    auth_file(Path(kvmpod.env["REGISTRY_AUTH_FILE"]), {f"http://{registry.proxy.host}": "tester:s3cret"})
    kvmpod.ok("fetch", "--insecure-options=http", ref)
    assert len(kvmpod.records()) == 1
    assert proxy_rules.tokens and len(proxy_rules.blob_gets()) == 3


def test_https_is_verified_against_the_ca_file(kvmpod, registry_tls):
    ref = f"docker://{registry_tls.host}/{REPOSITORY}:latest"
    error = one_error(kvmpod("fetch", ref))
    assert error.startswith(f"{ref}: https://{registry_tls.host}/v2/: TLS certificate not trusted (")
    assert error.endswith("give its CA with --ca-file, or --insecure-options=tls")
    kvmpod.assert_nothing_stored()
    image_id = kvmpod.ok("fetch", "--ca-file", str(registry_tls.ca_file), ref).strip()
    [record] = kvmpod.records()
    assert record["id"] == image_id and record["source"].startswith(f"{ref}@sha256:")
    kvmpod.ok("image", "rm", image_id)
    assert kvmpod.ok("fetch", "--insecure-options=tls", ref).strip() == image_id


def test_run_uses_an_image_pulled_before_without_asking_the_registry(tmp_path, monkeypatch, registry, proxy_rules):
    from kvmpod.image.limits import ImportLimits
    from kvmpod.image.transfer import Transfer
    from kvmpod.store.store import Store

    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "no-auth.json"))
    store = Store(tmp_path / "store", limits=ImportLimits(), transfer=Transfer.from_flags("http", None))
    ref = f"docker://{registry.proxy.host}/{REPOSITORY}:latest"
    first = store.resolve(ref)  # `kvmpod run`: not in the store yet, so pulled
    assert proxy_rules.blob_gets() != []
    proxy_rules.requests.clear()
    assert store.resolve(ref).id == first.id and proxy_rules.requests == []  # rkt's and podman's run default
    with pytest.raises(ImageError, match="manifest unknown"):  # not pulled before: the registry is asked
        store.resolve(f"docker://{registry.proxy.host}/{REPOSITORY}:other")
    assert proxy_rules.requests == [("GET", "/v2/"), ("GET", f"/v2/{REPOSITORY}/manifests/other")]


def test_basic_auth_against_the_registrys_own_htpasswd(kvmpod, registry_basic):
    ref = f"docker://{registry_basic.host}/{REPOSITORY}:latest"
    ca = ("--ca-file", str(registry_basic.ca_file))
    error = one_error(kvmpod("fetch", *ca, ref))
    assert error == (f"{ref}: https://{registry_basic.host}/v2/: the registry wants a user name and password, and "
                     f"no credentials file has any for {registry_basic.host} (podman login, skopeo login, or "
                     "REGISTRY_AUTH_FILE)")
    auth = Path(kvmpod.env["REGISTRY_AUTH_FILE"])
    auth_file(auth, {registry_basic.host: f"{BASIC_USER}:wrong"})
    error = one_error(kvmpod("fetch", *ca, ref))
    assert error.startswith(f"{ref}: ") and error.endswith(
        f"credentials from {auth} not accepted (HTTP 401 from https://{registry_basic.host}/v2/{REPOSITORY}/"
        "manifests/latest)")
    kvmpod.assert_nothing_stored()
    auth_file(auth, {registry_basic.host: f"{BASIC_USER}:{BASIC_PASSWORD}"})
    kvmpod.ok("fetch", *ca, ref)
    assert len(kvmpod.records()) == 1


def test_a_redirected_blob_is_fetched_without_the_registrys_token(kvmpod, registry, proxy_rules):
    proxy_rules.credentials = ("tester", "s3cret")
    proxy_rules.redirect = True
    auth_file(Path(kvmpod.env["REGISTRY_AUTH_FILE"]), {registry.proxy.host: "tester:s3cret"})
    kvmpod.ok("fetch", "--insecure-options=http", f"docker://{registry.proxy.host}/{REPOSITORY}:latest")
    assert len(proxy_rules.direct) == 3 and all(auth is None for _, auth in proxy_rules.direct), proxy_rules.direct
    assert len(kvmpod.records()) == 1


def test_import_limits_stop_a_pull_before_its_blobs_are_downloaded(kvmpod, registry, proxy_rules):
    Path(kvmpod.env["KVMPOD_CONFIG"]).write_text('[image]\nmax-size = "1M"\n')
    ref = f"docker://{registry.proxy.host}/{REPOSITORY}:latest"
    error = one_error(kvmpod("fetch", "--insecure-options=http", ref))
    assert error.startswith(f"{ref}: the image's blobs are ") and error.endswith(
        "more than the 1.0 MiB image limit ([image] max-size in kvmpod.toml)")
    assert proxy_rules.blob_gets() == []
    kvmpod.assert_nothing_stored()


def test_two_pulls_of_one_image_at_once_store_it_once(kvmpod, registry):
    ref = f"docker://{registry.http_host}/{REPOSITORY}:latest"
    command = [sys.executable, "-m", "kvmpod", "--dir", str(kvmpod.store), "fetch", "--insecure-options=http", ref]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kvmpod.env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and len(kvmpod.records()) == 1
    assert len(kvmpod.cached_blobs()) == 4 and list((kvmpod.store / "tmp").iterdir()) == []
    assert kvmpod("image", "fsck").stdout == ""


def test_gc_and_fsck_know_the_layer_cache(kvmpod, registry):
    import hashlib

    kvmpod.ok("fetch", "--insecure-options=http", f"docker://{registry.http_host}/{REPOSITORY}:latest")
    needed = kvmpod.cached_blobs()
    stray = kvmpod.store / "layers" / "sha256" / hashlib.sha256(b"stray").hexdigest()
    stray.write_bytes(b"stray")
    damaged = kvmpod.store / "layers" / "sha256" / ("0" * 64)
    damaged.write_bytes(b"not what the name says")
    report = kvmpod("image", "fsck")
    assert report.returncode == 1 and sorted(report.stdout.splitlines()) == sorted([
        f"layers/sha256/{'0' * 64}: pulled blob's bytes do not match its digest sha256:{'0' * 64} "
        "(the next pull downloads it again)",
        f"layers/sha256/{stray.name}: pulled blob no stored image needs"])
    removed = kvmpod.ok("image", "gc")
    assert f"pulled blob sha256:{stray.name}" in removed and f"pulled blob sha256:{'0' * 64}" in removed
    assert kvmpod.cached_blobs() == needed and kvmpod("image", "fsck").stdout == ""
