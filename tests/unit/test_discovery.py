"""appc discovery, the trust store and the signature policy, end to end through `kvmpod fetch` and
`kvmpod trust` against a real https server on 127.0.0.1 (tests/discovery_server.py) with a test CA,
and keys made with gpg here. No VM: tests/e2e/test_discovery.py runs a discovered image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpod.cli import main
from kvmpod.errors import ImageError
from kvmpod.image.discovery import best_templates, meta_tags, render
from kvmpod.image.transfer import Transfer
from kvmpod.image.trust import prefixes_of
from kvmpod.store import Store
from tests.discovery_server import Cut, DiscoveryServer, Redirect, discovery_server  # noqa: F401 (fixture)
from tests.tls_fixture import tls_ca  # noqa: F401 (fixture)
from tests.unit.test_store import make_aci

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None or shutil.which("gpgv") is None,
                                reason="gpg and gpgv are needed (Debian packages gnupg, gpgv)")

PREFIX = "127.0.0.1/pub"
NAME = f"{PREFIX}/app"
LABELS = {"version": "1.0", "os": "linux", "arch": "amd64"}
OLD = "20200101T000000"     # the expired key's world: made then, valid for a day


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Throwaway keys (ed25519) in a private GNUPGHOME: the publisher's, another one, and one that expired."""
    home = tmp_path_factory.mktemp("gnupg")
    os.chmod(home, 0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}

    def gpg(*args: str) -> bytes:
        return subprocess.run(["gpg", "--batch", "--quiet", *args], env=env, check=True, capture_output=True).stdout

    files = {}
    for who in ("publisher", "other", "expired"):
        faked = ["--faked-system-time", OLD] if who == "expired" else []
        gpg(*faked, "--passphrase", "", "--quick-gen-key", f"{who}@kvmpod.test", "ed25519", "sign",
            "1d" if who == "expired" else "never")
        files[who] = home / f"{who}.asc"
        files[who].write_bytes(gpg("--armor", "--export", f"{who}@kvmpod.test"))
    files["publisher.gpg"] = home / "publisher.gpg"  # the binary form too
    files["publisher.gpg"].write_bytes(gpg("--export", "publisher@kvmpod.test"))

    def sign(path: Path, who: str = "publisher") -> Path:
        faked = ["--faked-system-time", "20200101T120000"] if who == "expired" else []
        gpg(*faked, "--yes", "--local-user", f"{who}@kvmpod.test", "--armor", "--detach-sign", "--output",
            f"{path}.asc", str(path))
        return Path(f"{path}.asc")

    def fingerprint(who: str) -> str:
        out = gpg("--with-colons", "--list-keys", f"{who}@kvmpod.test").decode()
        return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr"))

    yield files, sign, fingerprint
    subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)


@pytest.fixture
def site(discovery_server: DiscoveryServer, tmp_path, monkeypatch, tls_ca, keys):
    """The publisher's site: meta tags at 127.0.0.1/pub, an ACI signed by the publisher, its key;
    a private store, trust dir and kvmpod.toml pointing discovery at the server's port."""
    files, sign, _ = keys
    server = discovery_server
    config = tmp_path / "kvmpod.toml"
    config.write_text(server.config_text())
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    monkeypatch.setenv("KVMPOD_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("KVMPOD_TRUST_DIR", str(tmp_path / "trust"))
    server.pages[f"/pub?ac-discovery=1"] = server.meta_page(
        ("ac-discovery", PREFIX, f"{server.base}/images/{{name}}-{{version}}-{{os}}-{{arch}}.{{ext}}"),
        ("ac-discovery", PREFIX, f"{server.base}/images/{{name}}-latest.{{ext}}"),
        ("ac-discovery-pubkeys", PREFIX, f"{server.base}/pubkeys.asc"))
    server.pages["/pubkeys.asc"] = files["publisher"].read_bytes()
    aci = make_aci(tmp_path / "app.aci", name=NAME, labels=LABELS)
    sign(aci)
    publish(server, aci)
    return server, aci


def publish(server: DiscoveryServer, aci: Path, version: str = "1.0", signature: Path | None = None) -> None:
    path = f"/images/{NAME}-{version}-linux-amd64.aci"
    server.pages[path] = aci.read_bytes()
    signature = signature or Path(f"{aci}.asc")
    if signature.exists():
        server.pages[path + ".asc"] = signature.read_bytes()
    else:
        server.pages.pop(path + ".asc", None)


def kvmpod(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def trust_publisher(capsys, keys, prefix: str = PREFIX, who: str = "publisher") -> None:
    files, _, _ = keys
    code, out, err = kvmpod(capsys, "trust", "--prefix", prefix, "--skip-fingerprint-review", str(files[who]))
    assert code == 0, err
    assert f'for prefix "{prefix}" at ' in out


def nothing_imported() -> None:
    store = Store()
    assert store.list_records() == []
    assert [p for p in store.tmp.iterdir()] == [] if store.tmp.is_dir() else True


# --- the parts --------------------------------------------------------------------------------


def test_meta_tags_match_by_prefix_and_html_parsing():
    html = """<html><head><META name="ac-discovery" content="example.com https://a/{name}.{ext}">
    <meta name="ac-discovery" content="other.org https://b/{name}.{ext}"/>
    <meta name="ac-discovery-pubkeys" content="example.com/app https://a/keys.gpg">
    <meta name="description" content="example.com https://c/{name}.{ext}">
    <!-- <meta name="ac-discovery" content="example.com https://commented/{name}.{ext}"> -->
    </head></html>"""
    assert meta_tags(html, "example.com/app") == (["https://a/{name}.{ext}"], ["https://a/keys.gpg"])
    assert meta_tags(html, "example.com/other") == (["https://a/{name}.{ext}"], [])


def test_best_matching_templates_follow_the_spec():
    # spec/discovery.md's example: with a version the two versioned ones, without it the latest one
    t1 = "https://storage.example.com/{os}/{arch}/{name}-{version}.{ext}"
    t2 = "https://mirror.storage.example.com/{os}/{arch}/{name}-{version}.{ext}"
    t3 = "https://storage.example.com/{os}/{arch}/{name}-latest.{ext}"
    labels = {"os": "linux", "arch": "amd64"}
    assert best_templates([t1, t2, t3], {**labels, "version": "1.0.0"}) == [t1, t2]
    assert best_templates([t1, t2, t3], labels) == [t3]
    assert best_templates([t1], labels) == []
    assert render(t1, {"name": "example.com/reduce-worker", "version": "1.0.0", **labels, "ext": "aci.asc"}) == \
        "https://storage.example.com/linux/amd64/example.com/reduce-worker-1.0.0.aci.asc"
    assert prefixes_of("example.com/project/subproject") == ["example.com/project/subproject",
                                                              "example.com/project", "example.com"]


# --- fetch by name ------------------------------------------------------------------------------


def test_fetch_by_name_discovers_verifies_and_imports(site, capsys, keys, tls_ca):
    server, aci = site
    trust_publisher(capsys, keys)
    code, out, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{NAME}:1.0")
    assert code == 0, err
    record = Store().list_records()[0]
    assert out.strip() == record.id and record.name == NAME and record.labels["version"] == "1.0"
    assert record.signature == f"verified {keys[2]('publisher')}"
    assert record.source == f"{server.base}/images/{NAME}-1.0-linux-amd64.aci"
    # the parent path was asked after 127.0.0.1/pub/app had no page (the spec's walk up the name)
    assert server.requests[:2] == ["/pub/app?ac-discovery=1", "/pub?ac-discovery=1"]
    code, out, _ = kvmpod(capsys, "image", "list")
    assert f"verified {keys[2]('publisher')[-16:]}" in out
    # in the store now: fetch and run find it there, without asking the server again
    asked = len(server.requests)
    assert kvmpod(capsys, "fetch", f"{NAME}:1.0")[1].strip() == record.id
    assert Store().resolve(f"{NAME}:1.0").id == record.id and len(server.requests) == asked


def test_without_a_version_the_latest_template_is_used(site, capsys, keys, tls_ca, tmp_path):
    server, _ = site
    _, sign, _ = keys
    latest = make_aci(tmp_path / "latest.aci", name=NAME, labels={**LABELS, "version": "2.0"})
    sign(latest)
    server.pages[f"/images/{NAME}-latest.aci"] = latest.read_bytes()
    server.pages[f"/images/{NAME}-latest.aci.asc"] = Path(f"{latest}.asc").read_bytes()
    trust_publisher(capsys, keys)
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), NAME)
    assert code == 0, err
    assert Store().list_records()[0].labels["version"] == "2.0"


def test_tls_is_verified_against_the_ca_file_or_skipped_with_insecure_tls(site, capsys, keys):
    trust_publisher(capsys, keys)
    code, _, err = kvmpod(capsys, "fetch", f"{NAME}:1.0")
    assert code == 125 and len(err.splitlines()) == 1
    assert "https://127.0.0.1:" in err and "/pub/app?ac-discovery=1: discovery failed" in err
    assert "CERTIFICATE_VERIFY_FAILED" in err or "certificate verify failed" in err
    assert err.endswith(" (a private CA: --ca-file FILE; or --insecure-options=tls)\n")
    nothing_imported()
    code, _, err = kvmpod(capsys, "fetch", "--insecure-options=tls", f"{NAME}:1.0")
    assert code == 0, err


def test_plain_http_discovery_is_refused_without_insecure_http(site, capsys, tmp_path, keys):
    server, _ = site
    server.pages["/pub?ac-discovery=1"] = server.meta_page(
        ("ac-discovery", PREFIX, f"http://127.0.0.1:{server.port}/images/{{name}}-{{version}}-{{os}}-{{arch}}.{{ext}}"))
    code, _, err = kvmpod(capsys, "fetch", "--insecure-options=tls", f"{NAME}:1.0")
    assert code == 125 and "no ac-discovery template is https (or http with --insecure-options=http)" in err


def test_simple_discovery_when_there_are_no_meta_tags(site, capsys, keys, tls_ca, tmp_path):
    server, aci = site
    for path in [p for p in server.pages if "ac-discovery" in p]:
        del server.pages[path]
    server.pages["/pub/app-1.0-linux-amd64.aci"] = aci.read_bytes()
    server.pages["/pub/app-1.0-linux-amd64.aci.asc"] = Path(f"{aci}.asc").read_bytes()
    trust_publisher(capsys, keys)
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{NAME}:1.0")
    assert code == 0, err
    assert Store().list_records()[0].source == f"{server.base}/pub/app-1.0-linux-amd64.aci"
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{NAME}:3.0")
    assert code == 125 and "app-3.0-linux-amd64.aci: HTTP 404 Not Found (found by simple discovery" in err


# --- the policy's refusals: one line each, nothing imported --------------------------------------------


@pytest.mark.parametrize("case, why", [
    ("tampered", r"signature app-1.0-linux-amd64.aci.asc does not verify against the trusted keys: bad signature"),
    ("other key", r"image 127.0.0.1/pub/app falls under trusted prefix 127.0.0.1/pub and is signed by key "
                  r"[0-9A-F]{40}, which is not trusted for it: refused"),
    ("unknown key", r"image 127.0.0.1/pub/app: signature .* is by key [0-9A-F]{16}, which is not trusted for "
                    r"trusted prefix 127.0.0.1/pub: refused \(kvmpod trust --prefix 127.0.0.1/pub KEYFILE "
                    r"\(publisher's keys: https://127.0.0.1:\d+/pubkeys.asc\)"),
    ("unsigned", r"image 127.0.0.1/pub/app falls under trusted prefix 127.0.0.1/pub and has no signature: refused"),
    ("expired key", r"signature .* does not verify against the trusted keys: made by an expired key"),
    ("wrong name", r"discovered for 127.0.0.1/pub/app,version=1.0 but its manifest says name 127.0.0.1/pub/ap"),
    ("wrong version", r"discovered for 127.0.0.1/pub/app,version=1.0 but its manifest says version=1.1: refused"),
])
def test_what_the_policy_refuses(site, capsys, keys, tls_ca, tmp_path, case, why):
    server, aci = site
    files, sign, _ = keys
    trust_publisher(capsys, keys)
    if case == "tampered":
        signature = Path(f"{aci}.asc")
        make_aci(aci, name=NAME, labels=LABELS, files={"rootfs/hello": b"altered after signing"})
        publish(server, aci, signature=signature)
    elif case == "other key":
        trust_publisher(capsys, keys, prefix="127.0.0.1/elsewhere", who="other")
        sign(aci, "other")
        publish(server, aci)
    elif case == "unknown key":
        sign(aci, "other")
        publish(server, aci)
    elif case == "unsigned":
        Path(f"{aci}.asc").unlink()
        publish(server, aci)
    elif case == "expired key":
        # trusted while it was valid (pre-populated, as rkt allows); `kvmpod trust` would refuse it now
        fingerprint = keys[2]("expired").lower()
        key_dir = tmp_path / "trust" / "prefix.d" / PREFIX
        subprocess.run(["gpg", "--batch", "--yes", "--dearmor", "-o", str(key_dir / fingerprint),
                        str(files["expired"])], check=True, capture_output=True)
        sign(aci, "expired")
        publish(server, aci)
    else:
        wrong = make_aci(tmp_path / "wrong.aci", name=NAME[:-1] if case == "wrong name" else NAME,
                         labels={**LABELS, "version": "1.1"} if case == "wrong version" else LABELS)
        sign(wrong)
        publish(server, wrong)
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{NAME}:1.0")
    assert code == 125 and len(err.splitlines()) == 1, err
    assert err.startswith("kvmpod: error: ")
    import re
    assert re.search(why, err), err
    nothing_imported()


def test_insecure_image_lets_the_unsigned_one_in_with_a_notice(site, capsys, keys, tls_ca):
    server, aci = site
    trust_publisher(capsys, keys)
    Path(f"{aci}.asc").unlink()
    publish(server, aci)
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), "--insecure-options=image",
                          f"{NAME}:1.0")
    assert code == 0, err
    assert "falls under trusted prefix 127.0.0.1/pub and has no signature; taken anyway (--insecure-options=image)" in err
    assert Store().list_records()[0].signature == "unsigned"
    # in the store, it is still under the policy: running it asks for the flag again
    with pytest.raises(Exception, match="has no signature: refused"):
        Store().resolve(f"{NAME}:1.0")
    assert Store(transfer=Transfer.from_flags("image", None)).resolve(f"{NAME}:1.0").manifest.name == NAME


def test_an_interrupted_download_leaves_nothing(site, capsys, keys, tls_ca):
    server, aci = site
    trust_publisher(capsys, keys)
    server.pages[f"/images/{NAME}-1.0-linux-amd64.aci"] = Cut(aci.read_bytes())
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{NAME}:1.0")
    assert code == 125 and len(err.splitlines()) == 1 and f"{NAME}-1.0-linux-amd64.aci: " in err, err
    assert "truncated" in err or "cannot download" in err
    nothing_imported()


def test_images_outside_trusted_prefixes_are_unchanged_and_root_keys_or_the_switch_cover_all(
        site, capsys, keys, tls_ca, tmp_path, monkeypatch):
    files, sign, _ = keys
    plain = make_aci(tmp_path / "plain.aci", name="example.com/plain")
    trust_publisher(capsys, keys)  # a prefix elsewhere: example.com/plain is not under it
    assert kvmpod(capsys, "fetch", str(plain))[0] == 0
    config = Path(os.environ["KVMPOD_CONFIG"])
    config.write_text(config.read_text() + "require-signatures = true\n")
    code, _, err = kvmpod(capsys, "fetch", str(plain))
    assert code == 125 and "image example.com/plain falls under [image] require-signatures and has no signature" in err
    config.write_text(config.read_text().replace("require-signatures = true\n", ""))
    code, _, err = kvmpod(capsys, "trust", "--root", "--skip-fingerprint-review", str(files["other"]))
    assert code == 0, err
    code, _, err = kvmpod(capsys, "fetch", str(plain))
    assert code == 125 and "falls under a root key (every image) and has no signature" in err
    sign(plain, "other")
    code, _, err = kvmpod(capsys, "fetch", str(plain))
    assert code == 0, err
    assert Store().list_records()[-1].signature == f"verified {keys[2]('other')}"


# --- kvmpod trust ------------------------------------------------------------------------------------


def test_trust_by_discovery_needs_verified_tls_or_insecure_pubkey(site, capsys, keys, tls_ca, tmp_path):
    code, out, err = kvmpod(capsys, "trust", "--prefix", PREFIX, "--skip-fingerprint-review",
                            "--insecure-options=tls")
    assert code == 125 and "pubkeys.asc: a key fetched without a verified TLS connection is refused" in err
    assert not (tmp_path / "trust").exists()
    code, out, err = kvmpod(capsys, "trust", "--prefix", PREFIX, "--skip-fingerprint-review",
                            "--ca-file", str(tls_ca.ca_file))
    assert code == 0, err
    fingerprint = keys[2]("publisher").lower()
    assert (tmp_path / "trust" / "prefix.d" / PREFIX / fingerprint).is_file()
    code, out, _ = kvmpod(capsys, "trust", "list", "--json")
    assert [(k["prefix"], k["fingerprint"], k["uids"]) for k in json.loads(out)] == \
        [(PREFIX, fingerprint, ["publisher@kvmpod.test"])]
    code, out, err = kvmpod(capsys, "trust", "rm", fingerprint.upper())
    assert code == 0 and kvmpod(capsys, "trust", "list", "--json")[1].strip() == "[]"
    code, _, err = kvmpod(capsys, "trust", "--prefix", "127.0.0.1/nothing/here", "--skip-fingerprint-review",
                          "--ca-file", str(tls_ca.ca_file))
    assert code == 125 and "--prefix 127.0.0.1/nothing/here: no keys found by discovery" in err
    assert "/nothing/here?ac-discovery=1: HTTP 404; " in err and "/nothing?ac-discovery=1: HTTP 404; " in err
    assert f"{site[0].base}/?ac-discovery=1: HTTP 404)" in err  # the walk ends at the host, as the spec says


def test_trust_refuses_expired_keys_armored_and_binary_alike(site, capsys, keys, tmp_path):
    files, _, fingerprint = keys
    code, _, err = kvmpod(capsys, "trust", "--prefix", PREFIX, "--skip-fingerprint-review", str(files["expired"]))
    assert code == 125 and f"key {fingerprint('expired')}: the key expired (2020-01-02): not trusted" in err
    assert not (tmp_path / "trust").exists()
    code, out, err = kvmpod(capsys, "trust", "--root", "--skip-fingerprint-review", str(files["publisher.gpg"]))
    assert code == 0 and (tmp_path / "trust" / "root.d" / fingerprint("publisher").lower()).is_file(), err
    code, _, err = kvmpod(capsys, "trust", "--root", "--skip-fingerprint-review", str(tmp_path / "kvmpod.toml"))
    assert code == 125 and "kvmpod.toml: not an OpenPGP public key file" in err


def test_a_revoked_key_is_refused(keys, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPOD_TRUST_DIR", str(tmp_path / "trust"))
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    gpg = ["gpg", "--batch", "--quiet"]
    subprocess.run([*gpg, "--passphrase", "", "--quick-gen-key", "revoked@kvmpod.test", "ed25519", "sign", "never"],
                   env=env, check=True, capture_output=True)
    revocation = next((home / "openpgp-revocs.d").iterdir())
    cert = tmp_path / "revoke.asc"  # gpg writes it with a ':' before the armor, against accidents
    cert.write_text(revocation.read_text().replace(":-----BEGIN", "-----BEGIN"))
    subprocess.run([*gpg, "--import", str(cert)], env=env, check=True, capture_output=True)
    key = tmp_path / "revoked.asc"
    key.write_bytes(subprocess.run([*gpg, "--armor", "--export", "revoked@kvmpod.test"], env=env, check=True,
                                   capture_output=True).stdout)
    subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)
    code, _, err = kvmpod(capsys, "trust", "--prefix", "example.com", "--skip-fingerprint-review", str(key))
    assert code == 125 and f"{revocation.stem}: the key is revoked: not trusted" in err


def test_the_fingerprint_is_reviewed_on_a_terminal(keys, capsys, tmp_path, monkeypatch):
    files, _, fingerprint = keys
    monkeypatch.setenv("KVMPOD_TRUST_DIR", str(tmp_path / "trust"))
    code, _, err = kvmpod(capsys, "trust", "--prefix", "example.com", str(files["publisher"]))
    assert code == 125 and "the fingerprint is reviewed on a terminal (check it, then --skip-fingerprint-review)" in err

    class Terminal:
        def __init__(self, answers: list[str], real):
            self.answers, self.real = answers, real

        def isatty(self) -> bool:
            return True

        def readline(self) -> str:
            return self.answers.pop(0) if self.answers else ""

        def write(self, text: str) -> int:
            return self.real.write(text)

        def flush(self) -> None:
            self.real.flush()

    monkeypatch.setattr(sys, "stdin", Terminal(["no\n"], sys.stdin))
    monkeypatch.setattr(sys, "stderr", Terminal([], sys.stderr))
    code = main(["trust", "--prefix", "example.com", str(files["publisher"])])
    _, err = capsys.readouterr()
    spaced = " ".join(fingerprint("publisher")[i:i + 4] for i in range(0, 20, 4))
    assert code == 125 and f"GPG key fingerprint is: {spaced}  " in err and "publisher@kvmpod.test" in err
    assert "not trusted (declined); nothing stored" in err and not (tmp_path / "trust").exists()
    monkeypatch.setattr(sys, "stdin", Terminal(["maybe\n", "yes\n"], sys.stdin))
    assert main(["trust", "--prefix", "example.com", str(files["publisher"])]) == 0
    assert (tmp_path / "trust" / "prefix.d" / "example.com" / fingerprint("publisher").lower()).is_file()


def test_docker_and_oci_images_are_outside_prefix_and_root_keys_but_not_require_signatures(
        keys, capsys, tmp_path, monkeypatch):
    from tests.unit.test_oci import BUSYBOX_LAYER, docker_archive

    files, _, _ = keys
    monkeypatch.setenv("KVMPOD_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("KVMPOD_TRUST_DIR", str(tmp_path / "trust"))
    config = tmp_path / "kvmpod.toml"
    config.write_text("")
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    archive = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER], None, ["busybox:latest"])
    for how in ("--prefix=docker.io", "--root"):
        assert kvmpod(capsys, "trust", how, "--skip-fingerprint-review", str(files["publisher"]))[0] == 0
    code, _, err = kvmpod(capsys, "fetch", f"docker-archive:{archive}")
    assert code == 0, err  # docker.io/library/busybox is a name the conversion made: no appc signature to ask for
    assert Store().list_records()[0].signature == "not-checked"
    config.write_text("[image]\nrequire-signatures = true\n")
    code, _, err = kvmpod(capsys, "fetch", f"docker-archive:{archive}")
    assert code == 125 and len(err.splitlines()) == 1
    assert ("image docker.io/library/busybox falls under [image] require-signatures and is a Docker/OCI image, "
            "with no appc signature: refused") in err
    code, _, err = kvmpod(capsys, "fetch", "--insecure-options=image", f"docker-archive:{archive}")
    assert code == 0 and "taken anyway (--insecure-options=image)" in err


def test_plain_http_discovery_and_keys_need_insecure_http_and_pubkey(keys, capsys, tmp_path, monkeypatch, http_root):
    """A discovery server without TLS (tests/unit/conftest.py's http_root): https is tried first, then http."""
    files, sign, fingerprint = keys
    root, base = http_root
    port = int(base.rsplit(":", 1)[1])
    monkeypatch.setenv("KVMPOD_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("KVMPOD_TRUST_DIR", str(tmp_path / "trust"))
    config = tmp_path / "kvmpod.toml"
    config.write_text(DiscoveryServer(port).config_text())
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    (root / "pub").write_bytes(DiscoveryServer(port).meta_page(   # /pub?ac-discovery=1: the query is ignored
        ("ac-discovery", PREFIX, f"{base}/images/{{name}}-{{version}}-{{os}}-{{arch}}.{{ext}}"),
        ("ac-discovery-pubkeys", PREFIX, f"{base}/pubkeys.asc")))
    shutil.copy(files["publisher"], root / "pubkeys.asc")
    images = root / "images" / PREFIX
    images.mkdir(parents=True)
    sign(make_aci(images / "app-1.0-linux-amd64.aci", name=NAME, labels=LABELS))
    trust = ["trust", "--prefix", PREFIX, "--skip-fingerprint-review"]
    code, _, err = kvmpod(capsys, *trust)
    [error] = [line for line in err.splitlines() if line.startswith("kvmpod: ")]  # the rest: the server's log
    assert code == 125 and f"https://127.0.0.1:{port}/pub?ac-discovery=1: discovery failed: " in error
    code, _, err = kvmpod(capsys, *trust, "--insecure-options=http")
    assert code == 125 and f"{base}/pubkeys.asc: a key fetched without a verified TLS connection is refused" in err
    code, out, err = kvmpod(capsys, *trust, "--insecure-options=http,pubkey")
    assert code == 0 and fingerprint("publisher").lower() in out, err
    code, _, err = kvmpod(capsys, "fetch", "--insecure-options=http", f"{NAME}:1.0")
    assert code == 0, err
    assert Store().list_records()[0].signature == f"verified {fingerprint('publisher')}"


def test_discovery_can_be_turned_off(site, capsys, keys, tls_ca):
    server, _ = site
    config = Path(os.environ["KVMPOD_CONFIG"])
    config.write_text(config.read_text().replace("discovery = true", "discovery = false"))
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{NAME}:1.0")
    assert code == 125 and err == (f"kvmpod: error: {NAME},version=1.0: no such image in the store "
                                   "(`kvmpod image list` shows what is there)\n")
    assert server.requests == []


def test_discovery_follows_redirects_and_refuses_one_to_plain_http(site, capsys, keys, tls_ca):
    server, _ = site
    trust_publisher(capsys, keys)
    server.pages["/moved?ac-discovery=1"] = server.pages.pop("/pub?ac-discovery=1")
    server.pages["/pub?ac-discovery=1"] = Redirect(f"{server.base}/moved?ac-discovery=1")
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{NAME}:1.0")
    assert code == 0, err
    assert "/moved?ac-discovery=1" in server.requests
    Store().remove(Store().list_records()[0])
    asked = len(server.requests)
    server.pages["/pub?ac-discovery=1"] = Redirect(f"http://127.0.0.1:{server.port}/moved?ac-discovery=1")
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{NAME}:1.0")
    assert code == 125 and len(err.splitlines()) == 1
    assert f"/pub?ac-discovery=1: redirected to plain http http://127.0.0.1:{server.port}/moved?ac-discovery=1 " \
           "(refused without --insecure-options=http)" in err
    assert "/moved?ac-discovery=1" not in server.requests[asked:]  # not even asked
    nothing_imported()


def test_a_url_import_is_not_redirected_down_to_plain_http(site, capsys, tls_ca):
    server, aci = site
    server.pages["/moved.aci"] = Redirect(f"http://127.0.0.1:{server.port}/images/{NAME}-1.0-linux-amd64.aci")
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{server.base}/moved.aci")
    assert code == 125 and err == (f"kvmpod: error: {server.base}/moved.aci: redirected to plain http "
                                   f"http://127.0.0.1:{server.port}/images/{NAME}-1.0-linux-amd64.aci "
                                   "(refused without --insecure-options=http)\n")
    nothing_imported()
    server.pages["/moved.aci"] = Redirect(f"{server.base}/images/{NAME}-1.0-linux-amd64.aci")
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), f"{server.base}/moved.aci")
    assert code == 0, err


def test_trust_dirs_of_root_and_of_a_user_and_disabling_a_shipped_key(monkeypatch, tmp_path, keys):
    from kvmpod import paths
    from kvmpod.image.trust import TrustStore

    monkeypatch.delenv("KVMPOD_TRUST_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(paths, "_is_root", lambda: True)
    assert paths.trust_dirs() == [Path("/etc/kvmpod/trust")] and paths.trust_dir() == Path("/etc/kvmpod/trust")
    monkeypatch.setattr(paths, "_is_root", lambda: False)
    assert paths.trust_dirs() == [Path("/etc/kvmpod/trust"), tmp_path / "xdg" / "kvmpod" / "trust"]
    assert paths.trust_dir() == tmp_path / "xdg" / "kvmpod" / "trust"
    # a key shipped in the first directory, disabled by an empty file of its name in the later one (rkt's rule)
    fingerprint = keys[2]("publisher").lower()
    shipped, mine = tmp_path / "shipped", tmp_path / "mine"
    (shipped / "prefix.d" / "example.com").mkdir(parents=True)
    shutil.copy(keys[0]["publisher.gpg"], shipped / "prefix.d" / "example.com" / fingerprint)
    store = TrustStore([shipped, mine])
    assert [(k.prefix, k.fingerprint) for k in store.keys()] == [("example.com", fingerprint)]
    assert str(store.requirement("example.com/app")) == "trusted prefix example.com"
    assert store.requirement("example.org/app") is None and store.requirement("example.com.evil/app") is None
    (mine / "prefix.d" / "example.com").mkdir(parents=True)
    (mine / "prefix.d" / "example.com" / fingerprint).touch()
    assert store.keys() == [] and store.requirement("example.com/app") is None


def test_a_dependency_answers_to_the_policy_too(site, capsys, keys, tls_ca, tmp_path):
    """An unsigned image under a trusted prefix, let in once with --insecure-options=image, cannot enter a
    pod later as the dependency of an image outside the prefix."""
    server, aci = site
    trust_publisher(capsys, keys)
    Path(f"{aci}.asc").unlink()
    publish(server, aci)
    code, _, err = kvmpod(capsys, "fetch", "--ca-file", str(tls_ca.ca_file), "--insecure-options=image",
                          f"{NAME}:1.0")
    assert code == 0, err
    app = make_aci(tmp_path / "outside.aci", name="example.com/outside",
                   extra={"dependencies": [{"imageName": NAME, "labels": [{"name": "version", "value": "1.0"}]}]})
    image = Store().import_aci(app)  # outside every trusted prefix: no signature needed for itself
    with pytest.raises(ImageError, match=rf"^example.com/outside: dependency {NAME},version=1.0: image {NAME} "
                                         r"falls under trusted prefix 127.0.0.1/pub and has no signature: refused"):
        Store().rootfs_disk(image)
    assert not list(Store().disks.glob("*.iso"))
    assert Store(transfer=Transfer.from_flags("image", None)).rootfs_disk(image).is_file()
