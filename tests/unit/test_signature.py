"""ACI signatures: verified against the trusted keyring, refused when they fail, recorded in the store."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from kvmpod.errors import ImageError
from kvmpod.image.limits import ImportLimits
from kvmpod.store import Store
from tests.unit.test_store import make_aci

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None or shutil.which("gpgv") is None,
                                reason="gpg and gpgv are needed (Debian packages gnupg, gpgv)")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two throwaway signing keys in a private GNUPGHOME: one trusted (in the keyring), one not."""
    home = tmp_path_factory.mktemp("gnupg")
    os.chmod(home, 0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}

    def gpg(*args: str) -> str:
        return subprocess.run(["gpg", "--batch", "--quiet", *args], env=env, check=True, capture_output=True,
                              text=True).stdout

    for who in ("trusted@kvmpod.test", "stranger@kvmpod.test"):
        gpg("--passphrase", "", "--quick-gen-key", who, "ed25519", "sign", "never")
    keyring = home / "trusted.gpg"
    keyring.write_bytes(subprocess.run(["gpg", "--batch", "--export", "trusted@kvmpod.test"], env=env,
                                       check=True, capture_output=True).stdout)

    def sign(path, who: str = "trusted@kvmpod.test"):
        gpg("--yes", "--local-user", who, "--armor", "--detach-sign", "--output", f"{path}.asc", str(path))

    yield keyring, sign
    subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)


@pytest.fixture
def trusting(keys, tmp_path, monkeypatch):
    keyring, sign = keys
    config = tmp_path / "kvmpod.toml"
    config.write_text(f'[image]\ntrusted-keys = "{keyring}"\n')
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return sign


def test_a_good_signature_is_recorded_as_verified(trusting, tmp_path):
    aci = make_aci(tmp_path / "app.aci")
    store = Store(tmp_path / "store", limits=ImportLimits())
    assert store.import_aci(aci).signature == "unsigned"
    trusting(aci)  # a signature appears next to the unchanged file: checked on the next import
    image = store.import_aci(aci)
    assert image.signature.startswith("verified ") and len(image.signature.split()[1]) == 40
    assert store.list_records()[0].signature == image.signature


@pytest.mark.parametrize("damage, why", [
    ("tamper", "bad signature"),
    ("stranger", "made by a key that is not trusted"),
    ("garbage", "gpgv refused it|not an OpenPGP signature"),
])
def test_a_signature_that_fails_refuses_the_import(trusting, tmp_path, damage, why):
    aci = make_aci(tmp_path / "app.aci")
    if damage == "stranger":
        trusting(aci, "stranger@kvmpod.test")
    elif damage == "garbage":
        (tmp_path / "app.aci.asc").write_text("-----BEGIN PGP SIGNATURE-----\nnope\n-----END PGP SIGNATURE-----\n")
    else:
        trusting(aci)
        make_aci(aci, files={"rootfs/hello": b"altered after signing"})
    store = Store(tmp_path / "store", limits=ImportLimits())
    if damage == "stranger":  # decided once the name is known: the message names the image
        why = r"image example.com/app: signature app.aci.asc is by key [0-9A-F]{16}, which is not trusted: refused"
    else:
        why = rf"signature app.aci.asc does not verify against the trusted keys: ({why})"
    with pytest.raises(ImageError, match=rf"app.aci: {why}"):
        store.import_aci(aci)
    assert store.list_records() == []
    if damage == "stranger":  # the name had to be read first: nothing is left of that work
        assert [p for p in store.root.rglob("*") if not p.is_dir()] == []
    else:
        assert not store.root.exists()  # refused before any work


def test_without_trusted_keys_a_signature_is_unverified_with_a_notice(keys, tmp_path, monkeypatch):
    _, sign = keys
    config = tmp_path / "kvmpod.toml"
    config.write_text(f'[image]\ntrusted-keys = "{tmp_path / "none.gpg"}"\n')
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    aci = make_aci(tmp_path / "app.aci")
    sign(aci)
    notices: list[str] = []
    image = Store(tmp_path / "store", limits=ImportLimits(), notify=notices.append).import_aci(aci)
    assert image.signature == "unverified"
    assert notices == [f"{aci}: signature not checked: no trusted keys (kvmpod trust, or a keyring in "
                       f"{tmp_path / 'none.gpg'}: [image] trusted-keys in kvmpod.toml)"]


def test_a_url_is_checked_against_its_asc_next_to_it(trusting, tmp_path, http_root):
    root, base = http_root
    make_aci(root / "app.aci")
    store = Store(tmp_path / "store", limits=ImportLimits())
    assert store.import_ref(f"{base}/app.aci").signature == "unsigned"  # no app.aci.asc: a 404
    trusting(root / "app.aci")
    assert store.import_ref(f"{base}/app.aci").signature.startswith("verified ")
    make_aci(root / "app.aci", files={"rootfs/hello": b"swapped on the server"})
    with pytest.raises(ImageError, match="does not verify"):
        store.import_ref(f"{base}/app.aci")
    assert not any(store.tmp.iterdir())


def test_the_trusted_keys_keyring_counts_as_root_keys_under_require_signatures(trusting, tmp_path, monkeypatch):
    config = tmp_path / "kvmpod.toml"
    config.write_text(config.read_text() + "require-signatures = true\n")
    store = Store(tmp_path / "store", limits=ImportLimits())
    unsigned = make_aci(tmp_path / "unsigned.aci", name="example.com/unsigned")
    with pytest.raises(ImageError, match="image example.com/unsigned falls under .image. require-signatures and "
                                         "has no signature: refused"):
        store.import_aci(unsigned)
    aci = make_aci(tmp_path / "app.aci")
    trusting(aci)
    assert store.import_aci(aci).signature.startswith("verified ")
