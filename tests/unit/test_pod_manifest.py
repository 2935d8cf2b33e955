"""`kvmpod run --pod-manifest`: the PodManifest's validation (one exact line each), and what it means
for the apps: images by (short) ID from the store, name checks, app replacement, refusals, pod limits."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

import pytest

from kvmpod.cli import main
from kvmpod.errors import ImageError, ManifestError, UsageError
from kvmpod.image import manifest as m
from kvmpod.pod.podmanifest import POD_SCHEMA, PodManifest, parse_pod_manifest
from kvmpod.pod.resources import app_resources, size_vm
from kvmpod.pod.spec import isolator_notices, pod_manifest, resolve_app
from kvmpod.schema import SchemaFile
from kvmpod.store import Store, StoredImage
from tests.unit.test_manifest import HANDLED_KEYWORDS, _keywords

IMAGE = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/web",
         "labels": [{"name": "version", "value": "1.0"}],
         "app": {"exec": ["/bin/web", "--port=80"], "user": "0", "group": "0",
                 "environment": [{"name": "FROM", "value": "image"}],
                 "isolators": [{"name": "resource/memory", "value": {"limit": "100Mi"}}]},
         "annotations": [{"name": "owner", "value": "image"}]}
ID = "sha512-" + "ab" * 64
POD = {"acKind": "PodManifest", "acVersion": "0.8.11",
       "apps": [{"name": "web", "image": {"id": ID, "name": "example.com/web"}},
                {"name": "worker", "image": {"id": ID[:7 + 64]}, "readOnlyRootFS": True,
                 "annotations": [{"name": "role", "value": "worker"}],
                 "app": {"exec": ["/bin/work", "-v"], "user": "10", "group": "20", "workingDirectory": "/w",
                         "environment": [{"name": "MODE", "value": "fast"}], "supplementaryGIDs": [5]}}],
       "isolators": [{"name": "resource/memory", "value": {"limit": "1Gi"}}],
       "annotations": [{"name": "team", "value": "infra"}]}


def _pod(**changes) -> dict:
    pod = copy.deepcopy(POD)
    pod.update(changes)
    return pod


def _parse(obj: dict) -> PodManifest:
    return parse_pod_manifest(json.dumps(obj).encode())


def _error(obj: dict) -> str:
    with pytest.raises(ManifestError) as e:
        _parse(obj)
    return str(e.value)


def _stored(manifest: dict = IMAGE, image_id: str = ID) -> StoredImage:
    return StoredImage(image_id, Path("/nonexistent"), m.parse_manifest(json.dumps(manifest).encode()))


def _resolve(pod: PodManifest, index: int, image: StoredImage | None = None, pod_env: dict | None = None):
    return resolve_app(image or _stored(), pod.app_overrides()[index], pod_env or {}, Path("/d.iso"), "img0")


# -- validation --------------------------------------------------------------------------------

def test_the_spec_shaped_example_parses():
    pod = _parse(POD)
    assert [a.name for a in pod.apps] == ["web", "worker"]
    assert pod.annotations == {"team": "infra"} and pod.isolators == [m.Isolator("resource/memory", {"limit": "1Gi"})]
    web, worker = pod.apps
    assert web.image_id == ID and web.image_name == "example.com/web" and web.app is None and not web.readonly_rootfs
    assert worker.readonly_rootfs and worker.annotations == {"role": "worker"}
    assert worker.app == m.App(exec=["/bin/work", "-v"], user="10", group="20", working_directory="/w",
                               environment=[m.EnvVar("MODE", "fast")], supplementary_gids=[5])


def _app(i: int, **changes) -> dict:
    pod = _pod()
    pod["apps"][i].update(changes)
    return pod


@pytest.mark.parametrize("obj, line", [
    (_app(1, name="Web_App"), 'pod manifest: apps[1].name: "Web_App" is not an AC Name'),
    (_pod(acKind="ImageManifest"), 'pod manifest: acKind: "ImageManifest" is not "PodManifest"'),
    ({"acKind": "PodManifest", "acVersion": "0.8.11"}, "pod manifest: apps: required field is missing"),
    (_pod(apps=[]), "pod manifest: apps: [] is an empty list"),
    (_app(0, image={"name": "example.com/web"}), "pod manifest: apps[0].image.id: required field is missing"),
    (_app(0, image={"id": "sha512-abc"}),
     'pod manifest: apps[0].image.id: "sha512-abc" is not an image ID ("sha512-" and 12 to 128 lower-case hex '
     'digits, a unique prefix)'),
    (_app(0, image={"id": ID, "name": "Example.com"}), 'pod manifest: apps[0].image.name: "Example.com" is not an '
                                                       "AC Identifier"),
    (_app(1, name="web"), 'pod manifest: apps[1].name: "web" is a duplicate app name'),
    (_pod(annotations=[{"name": "a", "value": "1"}, {"name": "a", "value": "2"}]),
     'pod manifest: annotations[1].name: "a" is a duplicate annotation name'),
    (_app(0, annotations=[{"name": "a", "value": "1"}, {"name": "a", "value": "2"}]),
     'pod manifest: apps[0].annotations[1].name: "a" is a duplicate annotation name'),
    (_pod(annotations=[{"name": "a.b/c", "value": "1"}]), 'pod manifest: annotations[0].name: "a.b/c" is not an AC Name'),
    (_app(0, readOnlyRootFS="yes"), 'pod manifest: apps[0].readOnlyRootFS: "yes" is not a boolean'),
    # the app object is the image manifest's, with its rules
    (_app(1, app={"exec": ["bin/work"], "user": "0", "group": "0"}),
     'pod manifest: apps[1].app.exec[0]: "bin/work" is not an absolute path'),
    (_app(1, app={"exec": ["/w"], "group": "0"}), "pod manifest: apps[1].app.user: required field is missing"),
    (_app(1, app={"exec": ["/w"], "user": "0", "group": "0",
                  "environment": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}),
     'pod manifest: apps[1].app.environment[1].name: "A" is a duplicate environment variable name'),
    (_app(1, app={"exec": ["/w"], "user": "0", "group": "0",
                  "isolators": [{"name": "resource/cpu", "value": {"limit": "lots"}}]}),
     'pod manifest: apps[1].app.isolators[0].value.limit: "lots" is not a resource quantity'),
    (_app(1, app={"exec": ["/w"], "user": "0", "group": "0", "isolators": [NNP := {"name": "os/linux/no-new-privileges",
                                                                               "value": True}, NNP]}),
     'pod manifest: apps[1].app.isolators[1].name: "os/linux/no-new-privileges" is given twice '
     "(also apps[1].app.isolators[0])"),
    (_pod(isolators=[{"name": "resource/memory", "value": {"limit": "-1"}}]),
     'pod manifest: isolators[0].value.limit: "-1" is not a resource quantity'),
    (_pod(ports=[{"name": "ftp", "hostPort": 2121, "hostIP": "::1"}]),
     'pod manifest: ports[0].hostIP: "::1" is not an IPv4 address'),
    (_pod(ports=[{"name": "ftp", "hostPort": 2121}, {"name": "ftp", "hostPort": 2122}]),
     'pod manifest: ports[1].name: "ftp" is a duplicate port name'),
])
def test_each_problem_is_one_exact_line(obj, line):
    assert _error(obj) == line


def test_empty_volumes_and_ports_are_what_kvmpod_writes_and_pass():
    assert _parse(_pod(volumes=[], ports=[])).apps


def test_not_json_and_not_an_object():
    with pytest.raises(ManifestError, match=r"^pod manifest: invalid JSON at line 1 column 2"):
        parse_pod_manifest(b"{,}")
    with pytest.raises(ManifestError, match=r"^pod manifest: top level is not a JSON object$"):
        parse_pod_manifest(b"[]")
    with pytest.raises(ManifestError, match=r"^pod manifest: invalid JSON: number 1e999 is out of range$"):
        parse_pod_manifest(b'{"apps": 1e999}')


def test_the_pod_schema_is_valid_and_uses_the_image_schemas_app():
    from jsonschema import Draft202012Validator
    schema = POD_SCHEMA.schema()
    Draft202012Validator.check_schema(schema)
    assert set(_keywords(schema)) <= HANDLED_KEYWORDS  # every failure has its error wording
    assert schema["$defs"]["app"]["properties"]["app"] == {"$ref": "image-manifest.schema.json#/$defs/app"}
    assert isinstance(POD_SCHEMA, SchemaFile) and POD_SCHEMA.uses == (m.IMAGE_SCHEMA,)


def test_a_kvmpod_written_pod_manifest_is_a_valid_input():
    pod = _parse(POD)
    written = pod_manifest([_resolve(pod, 0), _resolve(pod, 1)], pod.annotations, pod.isolators)
    again = _parse(written)
    assert [a.name for a in again.apps] == ["web", "worker"] and again.apps[1].annotations == {"role": "worker"}


# -- semantics ------------------------------------------------------------------------------------

def test_without_an_app_object_the_image_app_runs_and_with_one_it_is_replaced_whole():
    pod = _parse(POD)
    web = _resolve(pod, 0, pod_env={"POD": "1"})
    assert web.argv == ["/bin/web", "--port=80"] and "FROM=image" in web.env and "POD=1" in web.env
    assert web.app_isolators == [m.Isolator("resource/memory", {"limit": "100Mi"})] and not web.readonly_rootfs
    worker = _resolve(pod, 1, pod_env={"POD": "1"})
    assert worker.argv == ["/bin/work", "-v"] and (worker.user, worker.group) == ("10", "20")
    assert worker.working_dir == "/w" and worker.supplementary_gids == [5] and worker.readonly_rootfs
    assert "MODE=fast" in worker.env and "POD=1" in worker.env and not any(e.startswith("FROM=") for e in worker.env)
    assert worker.app_isolators == [] and worker.name == "worker"


def test_per_app_and_pod_annotations_and_isolators_go_into_the_written_pod_manifest():
    pod = _parse(POD)
    written = pod_manifest([_resolve(pod, 0), _resolve(pod, 1)], pod.annotations, pod.isolators)
    assert written["apps"][0]["annotations"] == []
    assert written["apps"][1]["annotations"] == [{"name": "role", "value": "worker"}]
    assert written["apps"][1]["readOnlyRootFS"] is True
    assert written["annotations"] == [{"name": "team", "value": "infra"}]
    assert written["isolators"] == [{"name": "resource/memory", "value": {"limit": "1Gi"}}]


def test_an_image_name_or_label_that_does_not_match_is_a_clear_error():
    pod = _parse(_app(0, image={"id": ID, "name": "example.com/other"}))
    with pytest.raises(ImageError, match=r"^app web: image.name 'example.com/other' does not match image "
                                         r"sha512-abababababab \(named 'example.com/web'\)$"):
        _resolve(pod, 0)
    pod = _parse(_app(0, image={"id": ID, "labels": [{"name": "version", "value": "2.0"}]}))
    with pytest.raises(ImageError, match=r"^app web: image.labels: version='2.0' does not match image "):
        _resolve(pod, 0)
    assert _resolve(_parse(_app(0, image={"id": ID, "labels": [{"name": "version", "value": "1.0"}]})), 0)


def test_an_app_object_without_exec_is_an_error():
    pod = _parse(_app(1, app={"user": "0", "group": "0"}))
    with pytest.raises(UsageError, match="^app worker: the pod manifest's app has no exec$"):
        _resolve(pod, 1)


def test_pod_isolators_bound_the_apps_and_others_get_a_notice():
    pod = _parse(_pod(isolators=[{"name": "resource/memory", "value": {"limit": "64Mi"}},
                                 {"name": "os/linux/oom-score-adj", "value": 5}]))
    apps = [_resolve(pod, 0), _resolve(pod, 1)]
    with pytest.raises(UsageError, match=r"apps' resource/memory limits \(100 MiB\) exceed the pod's \(64 MiB\)"):
        size_vm([app_resources(a.name, a.app_isolators) for a in apps], app_resources("pod", pod.isolators))
    assert isolator_notices(apps, pod.isolators) == ["pod: isolator os/linux/oom-score-adj is not enforced"]
    pod = _parse(_pod(isolators=[{"name": "resource/memory", "value": {"limit": "200Mi"}},
                                 {"name": "resource/cpu", "value": {"limit": "2"}}]))
    size = size_vm([app_resources(a.name, a.app_isolators) for a in apps], app_resources("pod", pod.isolators),
                   host_cpus=4)
    assert size.memory_mib == 200 + 64 and size.cpus == 2  # 100 + 128 for the apps, capped by the pod's 200


# -- images from the store by ID ------------------------------------------------------------------

def _aci(tmp_path: Path, name: str) -> Path:
    manifest = json.dumps({**IMAGE, "name": name}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, data in (("manifest", manifest), ("rootfs/hello", b"hi\n")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / f"{name.rsplit('/', 1)[-1]}.aci"
    path.write_bytes(buf.getvalue())
    return path


def test_images_are_found_by_full_64_hex_or_prefix_ids_and_never_imported(tmp_path):
    store = Store(tmp_path / "store")
    image = store.import_aci(_aci(tmp_path, "example.com/web"))
    for given in (image.id, image.id[:7 + 64], image.id[:7 + 12]):
        pod = _parse(_app(0, image={"id": given, "name": "example.com/web"}))
        assert store.resolve(pod.app_overrides()[0].image).id == image.id
    pod = _parse(_app(0, image={"id": "sha512-" + "0" * 64}))
    with pytest.raises(ImageError, match="no such image in the store"):
        store.resolve(pod.app_overrides()[0].image)


# -- the command line --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, problem", [
    (["run", "--pod-manifest", "{pod}", "x.aci"], "--pod-manifest takes no IMAGE, app flags or arguments"),
    (["run", "--pod-manifest", "{pod}", "--", "-c"], "--pod-manifest takes no IMAGE, app flags or arguments"),
    (["run", "--pod-manifest", "{dir}/missing.json"], "--pod-manifest: {dir}/missing.json: No such file"),
    (["run", "--pod-manifest", "{bad}"], 'pod manifest: apps[1].name: "Web_App" is not an AC Name'),
    (["run"], "give an IMAGE or --pod-manifest FILE"),
])
def test_command_line_misuse_is_a_one_line_usage_error(tmp_path, capsys, argv, problem):
    (tmp_path / "pod.json").write_text(json.dumps(POD))
    (tmp_path / "bad.json").write_text(json.dumps(_app(1, name="Web_App")))
    fill = {"pod": str(tmp_path / "pod.json"), "bad": str(tmp_path / "bad.json"), "dir": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem.format(**fill) in err
