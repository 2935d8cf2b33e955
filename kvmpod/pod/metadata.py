"""The appc metadata service's data (docs/metadata.md): what the host pushes to the guest agent.

The service itself runs in the guest agent (guest-agent/src/metadata.c), which answers from the
documents built here and signs with the pod's HMAC key. This module makes the per-pod secrets (the
URL token and the key, kept in the pod directory as `hmac-key`), the documents (pod manifest, pod
annotations, and per app: image ID, image manifest, merged annotations), and the frames that carry
them (METADATA ... METADATA_START, docs/agent-protocol.md). `sign` and `verify` are the reference for
the agent's identity endpoint, for anything on the host that checks a pod's signatures.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid as uuidlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from kvmpod.agent import protocol as p
from kvmpod.errors import KvmpodError
from kvmpod.pod.metadata_secrets import METADATA_PORT, MetadataSecrets

if TYPE_CHECKING:
    from kvmpod.pod.spec import ResolvedApp

DOC_MAX: int = p.METADATA_DOC_MAX

Annotations = list[dict[str, str]]   # appc's [{"name": ..., "value": ...}], in order


def merge_annotations(image: Annotations, pod: Annotations) -> Annotations:
    """An app's annotations (spec/ace.md): the image's, then the pod manifest's for the app. A name the
    pod also gives keeps its place with the pod's value; new names follow in the pod's order."""
    merged = {a["name"]: a["value"] for a in image}
    for a in pod:
        merged[a["name"]] = a["value"]
    return [{"name": name, "value": value} for name, value in merged.items()]


def sign(key: bytes, pod_uuid: str, content: bytes) -> str:
    """What /pod/hmac/sign answers: base64(HMAC-SHA512(key, UUID bytes + content)), as rkt signs."""
    mac = hmac.new(key, uuidlib.UUID(pod_uuid).bytes + content, hashlib.sha512).digest()
    return base64.b64encode(mac).decode("ascii")


def verify(key: bytes, pod_uuid: str, content: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(key, pod_uuid, content).encode(), signature.encode())


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class AppMetadata:
    name: str
    image_id: bytes
    image_manifest: bytes
    annotations: bytes


@dataclass(frozen=True)
class PodMetadata:
    """Everything the agent serves for one pod, encoded as it goes on the wire."""

    uuid: str
    secrets: MetadataSecrets
    pod_manifest: bytes
    pod_annotations: bytes
    apps: tuple[AppMetadata, ...]

    @classmethod
    def build(cls, pod_uuid: str, manifest: dict[str, Any], resolved: Sequence["ResolvedApp"],
              pod_secrets: MetadataSecrets) -> "PodMetadata":
        """From the pod's resolved PodManifest (kvmpod.pod.spec.pod_manifest) and its apps."""
        images = {a.name: a.image for a in resolved}
        apps = []
        for app in manifest["apps"]:
            image = images[app["name"]]
            original = image.manifest.raw
            annotations = merge_annotations(original.get("annotations", []), app.get("annotations", []))
            apps.append(AppMetadata(app["name"], image.id.encode("ascii"), _json(original), _json(annotations)))
        metadata = cls(pod_uuid, pod_secrets, _json(manifest), _json(manifest.get("annotations", [])), tuple(apps))
        metadata._check_sizes()
        return metadata

    def _check_sizes(self) -> None:
        """Before the VM boots: the agent refuses a document larger than metadata_doc_max."""
        docs = [("the pod manifest", self.pod_manifest), ("the pod annotations", self.pod_annotations)]
        for a in self.apps:
            docs += [(f"app {a.name}: the image manifest", a.image_manifest),
                     (f"app {a.name}: the annotations", a.annotations)]
        for what, doc in docs:
            if len(doc) > DOC_MAX:
                raise KvmpodError(f"metadata service: {what} is {len(doc)} bytes, more than the "
                                  f"{DOC_MAX} bytes the guest agent serves")

    def messages(self) -> list[p.Metadata | p.MetadataStart]:
        """METADATA messages with every document, then METADATA_START (docs/agent-protocol.md): the
        pod's documents, then each app's under its APP_NAME, in pieces of at most DATA_CHUNK bytes,
        as many per message as a frame holds (Message.split)."""
        docs = [p.Metadata(pod_manifest=_pieces(self.pod_manifest), pod_annotations=_pieces(self.pod_annotations))]
        docs += [p.Metadata(app_name=a.name.encode(), image_id=_pieces(a.image_id),
                            image_manifest=_pieces(a.image_manifest), app_annotations=_pieces(a.annotations))
                 for a in self.apps]
        out: list[p.Metadata | p.MetadataStart] = [part for d in docs for part in d.split(p.MAX_PAYLOAD)]
        out.append(p.MetadataStart(pod_uuid=self.uuid.encode(), metadata_token=self.secrets.token.encode(),
                                   hmac_key=self.secrets.hmac_key.hex().encode(), metadata_port=METADATA_PORT))
        return out

    def frames(self) -> list[p.Frame]:
        return [p.frame(m) for m in self.messages()]


def _pieces(doc: bytes) -> list[bytes]:
    """A document as a repeated field's values: pieces of at most DATA_CHUNK bytes, at least one, so
    that an empty document is still there."""
    return [doc[i:i + p.DATA_CHUNK] for i in range(0, len(doc), p.DATA_CHUNK)] or [b""]
