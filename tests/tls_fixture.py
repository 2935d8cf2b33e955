"""A test CA and a server certificate for 127.0.0.1 (and localhost), made with the openssl command.

Used by the tests of everything that downloads over https (appc discovery, trust, registry pulls):
    from tests.tls_fixture import tls_ca  # noqa: F401  (a session fixture)
    def test_x(tls_ca): tls_ca.ca_file, tls_ca.cert_file, tls_ca.key_file, tls_ca.server_context()
The CA is not in the system's store: a client needs `--ca-file` (or `--insecure-options=tls`).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TestCA:
    ca_file: Path       # the CA's certificate (PEM): what --ca-file is given
    cert_file: Path     # the server's certificate, signed by the CA, for 127.0.0.1 and localhost
    key_file: Path      # the server's private key

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


def make_ca(directory: Path) -> TestCA:
    """An EC P-256 CA and server certificate valid for a day, in `directory`."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=kvmpod test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                          "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "server.ext")
    return TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory) -> TestCA:
    if shutil.which("openssl") is None:
        pytest.skip("the test CA is made with the openssl command (Debian package openssl)")
    return make_ca(tmp_path_factory.mktemp("tls"))
