"""Host side of the metadata service (docs/metadata.md): secrets, annotations, documents, frames.

The service itself (guest-agent/src/metadata.c) has C tests (make -C guest-agent test) and an e2e test
(tests/e2e/test_metadata.py); the signature pinned here is the one those C tests expect too.
"""

from __future__ import annotations

import json
import re
import stat
import uuid
from pathlib import Path

import pytest

from kvmpod.agent import gen_protocol as gen
from kvmpod.agent import protocol as p
from kvmpod.errors import KvmpodError
from kvmpod.image.manifest import parse_manifest
from kvmpod.pod import metadata as m
from kvmpod.pod.spec import AppOverrides, pod_manifest, resolve_app
from kvmpod.store import StoredImage

F, T = p.Field, p.MessageType
REPO = Path(__file__).resolve().parents[2]
POD_UUID = "6f1c3f8e-2b7a-4c1d-9e5f-0a1b2c3d4e5f"
SECRETS = m.MetadataSecrets("Tok3n_with-enough-entropy-000000000000000000", bytes(range(64)))


def _image(name: str = "example.com/web", annotations: list[dict] | None = None, **extra) -> StoredImage:
    manifest = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": name,
                "app": {"exec": ["/bin/app"], "user": "0", "group": "0"}, **extra}
    if annotations is not None:
        manifest["annotations"] = annotations
    return StoredImage("sha512-" + "ab" * 64, Path("/nonexistent"), parse_manifest(json.dumps(manifest).encode()))


def _app(image: StoredImage, name: str = "web", url: str = SECRETS.url):
    return resolve_app(image, AppOverrides(image="x.aci", name=name), {}, Path("/d.iso"), "img0", url)


def _ann(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in pairs]


# -- secrets and the URL ---------------------------------------------------------------------

def test_each_pod_gets_its_own_unguessable_token_and_key():
    a, b = m.MetadataSecrets.generate(), m.MetadataSecrets.generate()
    assert a.token != b.token and a.hmac_key != b.hmac_key
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", a.token)  # 256 bits in URL-safe base64, no padding
    assert len(a.hmac_key) == 64
    assert a.url == f"http://127.0.0.1:18112/{a.token}" and not a.url.endswith("/")


def test_the_key_is_kept_in_the_pod_directory_for_the_owner_only(tmp_path):
    path = SECRETS.save_key(tmp_path)
    assert path == tmp_path / "hmac-key" and path.read_bytes() == bytes(range(64))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):  # never replaced: whoever verifies later reads the pod's own key
        SECRETS.save_key(tmp_path)


def test_every_app_gets_the_metadata_url_and_cannot_override_it():
    image = _image(app={"exec": ["/bin/app"], "user": "0", "group": "0",
                        "environment": [{"name": "AC_METADATA_URL", "value": "http://image"}]})
    env = _app(image).env
    assert env[:3] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "AC_APP_NAME=web",
                       f"AC_METADATA_URL={SECRETS.url}"]
    assert [e for e in env if e.startswith("AC_METADATA_URL=")] == [f"AC_METADATA_URL={SECRETS.url}"]


# -- annotations -----------------------------------------------------------------------------

def test_app_annotations_are_the_images_merged_with_the_pods_in_order():
    image = _ann(("c", "1"), ("a", "2"), ("b", "3"))
    pod = _ann(("a", "pod"), ("z", "new"), ("d", "new2"))
    assert m.merge_annotations(image, pod) == _ann(("c", "1"), ("a", "pod"), ("b", "3"), ("z", "new"), ("d", "new2"))
    assert m.merge_annotations(image, []) == image
    assert m.merge_annotations([], pod) == pod


def test_documents_are_built_from_the_pod_manifest_and_the_original_image_manifests():
    web = _image(annotations=_ann(("example.com/first", "1"), ("example.com/second", "2")),
                 labels=[{"name": "version", "value": "1.0"}])
    db = _image("example.com/db")
    apps = [_app(web), _app(db, "db")]
    manifest = pod_manifest(apps)
    manifest["apps"][0]["annotations"] = _ann(("example.com/second", "pod"), ("example.com/third", "3"))
    manifest["annotations"] = _ann(("ip-address", "10.1.2.3"))
    md = m.PodMetadata.build(POD_UUID, manifest, apps, SECRETS)
    assert json.loads(md.pod_manifest) == manifest
    assert md.pod_annotations == b'[{"name":"ip-address","value":"10.1.2.3"}]'
    (a, b) = md.apps
    assert (a.name, a.image_id, b.name) == ("web", web.id.encode(), "db")
    assert json.loads(a.image_manifest) == web.manifest.raw
    assert a.annotations == (b'[{"name":"example.com/first","value":"1"},{"name":"example.com/second","value":"pod"},'
                             b'{"name":"example.com/third","value":"3"}]')
    assert b.annotations == b"[]"
    # the environment in the served pod manifest is the exact one, URL included
    assert {"name": "AC_METADATA_URL", "value": SECRETS.url} in manifest["apps"][0]["app"]["environment"]


# -- frames ----------------------------------------------------------------------------------

def _reassemble(frames: list[p.Frame]) -> tuple[dict, p.MetadataStart]:
    """What the agent makes of the frames: documents by (app or None, field), and METADATA_START."""
    docs: dict[tuple[str | None, p.Field], bytes] = {}
    *metadata, start = frames
    for frame in metadata:
        assert frame.type is T.METADATA and frame.stream == 0 and len(frame.payload) <= p.MAX_PAYLOAD
        message = p.Metadata.decode(frame.payload)
        app = message.app_name.decode() if message.app_name is not None else None
        if app is not None:  # an app's frame names it first
            assert next(p.iter_tlv(frame.payload))[0] == F.APP_NAME
        for spec in message.FIELDS[1:]:
            for value in getattr(message, spec.attr):
                assert len(value) <= p.DATA_CHUNK
                docs[app, F(spec.tag)] = docs.get((app, F(spec.tag)), b"") + value
    assert start.type is T.METADATA_START
    return docs, p.MetadataStart.decode(start.payload)


def test_frames_carry_every_document_then_start_the_service():
    apps = [_app(_image(annotations=_ann(("k", "v"))))]
    md = m.PodMetadata.build(POD_UUID, pod_manifest(apps), apps, SECRETS)
    docs, start = _reassemble(md.frames())
    assert docs == {(None, F.POD_MANIFEST): md.pod_manifest, (None, F.POD_ANNOTATIONS): b"[]",
                    ("web", F.IMAGE_ID): apps[0].image.id.encode(),
                    ("web", F.IMAGE_MANIFEST): md.apps[0].image_manifest,
                    ("web", F.APP_ANNOTATIONS): b'[{"name":"k","value":"v"}]'}
    assert start.pod_uuid == POD_UUID.encode() and start.metadata_token == SECRETS.token.encode()
    assert bytes.fromhex(start.hmac_key.decode()) == SECRETS.hmac_key and start.metadata_port == 18112


def test_large_documents_are_split_into_pieces_and_frames():
    big = "x" * 700_000  # an image manifest may be up to 1 MiB
    apps = [_app(_image(annotations=_ann(("big", big)))), _app(_image("example.com/db"), "db")]
    md = m.PodMetadata.build(POD_UUID, pod_manifest(apps), apps, SECRETS)
    frames = md.frames()
    assert len(frames) > 4
    docs, _ = _reassemble(frames)
    assert docs["web", F.IMAGE_MANIFEST] == md.apps[0].image_manifest
    assert json.loads(docs["web", F.APP_ANNOTATIONS]) == _ann(("big", big))
    assert docs["db", F.APP_ANNOTATIONS] == b"[]"


def test_a_document_the_agent_would_refuse_is_an_error_before_the_vm_boots(monkeypatch):
    monkeypatch.setattr(m, "DOC_MAX", 1500)  # above the pod manifest
    apps = [_app(_image(annotations=_ann(("big", "x" * 2000))))]
    with pytest.raises(KvmpodError, match=r"metadata service: app web: the image manifest is \d+ bytes, more than"):
        m.PodMetadata.build(POD_UUID, pod_manifest(apps), apps, SECRETS)


def test_the_document_limit_is_the_agents():
    """Both ends take it from protocol.toml: the host's messages.py, the agent's generated protocol.h."""
    header = (REPO / "guest-agent" / "src" / "metadata.h").read_text()
    assert re.search(r"#define METADATA_DOC_MAX KP_METADATA_DOC_MAX\b", header)
    assert gen.load()["metadata_doc_max"] == p.METADATA_DOC_MAX == m.DOC_MAX


# -- signatures ------------------------------------------------------------------------------

def test_signatures_bind_the_pod_uuid_and_the_content():
    # the same value guest-agent/tests/test_metadata.c expects from the agent
    expected = "FzEbs6WYVvh9npN7gNnf3vzTutFqlezIYp57xJPqAbDb0l6Hzcld36+I+mtgu1CXzSaRxmQ0u5uAQDVakHzVQA=="
    assert m.sign(SECRETS.hmac_key, POD_UUID, b"hello world & more") == expected
    assert m.verify(SECRETS.hmac_key, POD_UUID, b"hello world & more", expected)
    assert not m.verify(SECRETS.hmac_key, POD_UUID, b"hello world & mord", expected)
    assert not m.verify(SECRETS.hmac_key, str(uuid.uuid4()), b"hello world & more", expected)


# -- the agent's side ------------------------------------------------------------------------

def test_the_agents_c_tests_pass(agent_c_tests):
    """SHA-512/HMAC vectors and the HTTP side of the service (guest-agent/tests), built in a scratch dir."""
    assert re.search(r"metadata: \d+ checks, 0 failed", agent_c_tests.stdout)
