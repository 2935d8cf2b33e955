"""A pod's metadata-service secrets (docs/metadata.md): the token of its URL, which goes into every
app's environment while the pod is planned, and the key the service signs with. Kept apart from
kvmpod/pod/metadata.py, which needs the agent protocol, so that planning a pod does not load it."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

METADATA_HOST = "127.0.0.1"    # the guest's loopback: every app of the pod shares the guest's network
METADATA_PORT = 18112          # rkt's metadata service port; fixed, so apps may also find it without the env
TOKEN_BYTES = 32               # 256 random bits: the spec asks for at least 128
HMAC_KEY_BYTES = 64            # a SHA-512 block is 128 bytes; 512 random bits
HMAC_KEY_FILE = "hmac-key"     # in the pod directory, mode 0600


@dataclass(frozen=True)
class MetadataSecrets:
    """What makes the service the pod's own: the token of its URL and the key it signs with."""

    token: str
    hmac_key: bytes

    @classmethod
    def generate(cls) -> "MetadataSecrets":
        return cls(secrets.token_urlsafe(TOKEN_BYTES), secrets.token_bytes(HMAC_KEY_BYTES))

    @property
    def url(self) -> str:
        """AC_METADATA_URL: no trailing slash; the token is the first path segment."""
        return f"http://{METADATA_HOST}:{METADATA_PORT}/{self.token}"

    def save_key(self, pod_dir: Path) -> Path:
        """Keep the key in the pod directory (0600, never replaced) for whatever verifies the pod's
        signatures on the host. The token is not kept: it only matters while the pod runs."""
        path = pod_dir / HMAC_KEY_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.hmac_key)
        return path
