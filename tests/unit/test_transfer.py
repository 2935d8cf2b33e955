"""--insecure-options and --ca-file (kvmpod/image/transfer.py): rkt's words, one-line refusals."""

import ssl

import pytest

from kvmpod.errors import UsageError
from kvmpod.image.transfer import InsecureOptions, Transfer


@pytest.mark.parametrize("text, expected", [
    ("", InsecureOptions()),
    ("none", InsecureOptions()),
    ("image", InsecureOptions(image=True)),
    ("image,http", InsecureOptions(image=True, http=True)),
    (" tls , pubkey ", InsecureOptions(tls=True, pubkey=True)),
    ("all", InsecureOptions(True, True, True, True)),
])
def test_insecure_words(text, expected):
    assert InsecureOptions.parse(text) == expected


def test_an_unknown_word_is_named():
    with pytest.raises(UsageError, match=r"--insecure-options: unknown option 'ondisk'"):
        InsecureOptions.parse("image,ondisk")


def test_plain_http_needs_the_option():
    with pytest.raises(UsageError, match=r"^http://h/a.aci: plain http download refused"):
        Transfer().check_url("http://h/a.aci")
    Transfer().with_insecure(http=True).check_url("http://h/a.aci")
    Transfer().check_url("https://h/a.aci")


def test_tls_contexts(tmp_path):
    assert Transfer().ssl_context().verify_mode == ssl.CERT_REQUIRED
    insecure = Transfer.from_flags("tls", None).ssl_context()
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(UsageError, match=rf"--ca-file {bad}: not a readable PEM certificate file"):
        Transfer.from_flags("", str(bad)).ssl_context()
