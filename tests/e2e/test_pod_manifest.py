"""`kvmpod run --pod-manifest`: a two-app appc PodManifest from stored images, in one real VM."""

from __future__ import annotations

import json
import subprocess

from kvmpod.image.build import build_aci
from kvmpod.image.manifest import build_manifest
from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import the_error

# app "check": the rootfs is read-only, the metadata service merges the image's and the pod's annotations
CHECK = ('touch /probe 2>/dev/null && echo "check rw" || echo "check ro"; '
         'echo "check mem $(sed -n "s/^MemTotal: *\\([0-9]*\\) kB/\\1/p" /proc/meminfo)"; '
         'echo "check $POD_VAR"; '
         'echo "check app $(wget -q -O- "$AC_METADATA_URL/acMetadata/v1/apps/$AC_APP_NAME/annotations")"; '
         'echo "check pod $(wget -q -O- "$AC_METADATA_URL/acMetadata/v1/pod/annotations")"; exit 3')


def fetch(env: dict[str, str], aci) -> str:
    out = subprocess.run(kvmpod_cmd("fetch", str(aci)), capture_output=True, env=env, check=True).stdout
    return out.decode().split()[-1]


def pod_manifest(busybox_id: str, checker_id: str, **extra) -> dict:
    return {
        "acKind": "PodManifest", "acVersion": "0.8.11",
        "apps": [
            {"name": "greeter", "image": {"id": busybox_id[:7 + 64], "name": "example.com/busybox"},
             # replaces the image's app whole: its exec, and its environment (IMAGE_VAR is gone)
             "app": {"exec": ["/bin/sh", "-c", 'echo "greeter $MODE $POD_VAR [$IMAGE_VAR]"'], "user": "0",
                     "group": "0", "environment": [{"name": "MODE", "value": "replaced"}]}},
            {"name": "check", "image": {"id": checker_id[:7 + 16]}, "readOnlyRootFS": True,
             "annotations": [{"name": "role", "value": "reader"}]},
        ],
        "isolators": [{"name": "resource/memory", "value": {"limit": "300Mi"}}],
        "annotations": [{"name": "team", "value": "infra"}],
        **extra,
    }


def test_a_pod_manifest_with_two_apps(kvmpod, kvmpod_env, busybox_aci, busybox_rootfs, tmp_path):
    checker = tmp_path / "checker.aci"
    build_aci(busybox_rootfs, build_manifest("example.com/checker", exec_=["/bin/sh", "-c", CHECK],
                                             annotations={"owner": "image"}), checker)
    busybox_id, checker_id = fetch(kvmpod_env, busybox_aci), fetch(kvmpod_env, checker)
    manifest = tmp_path / "pod.json"
    manifest.write_text(json.dumps(pod_manifest(busybox_id, checker_id)))
    result = kvmpod.run("--set-env", "POD_VAR=pod-flag", "--pod-manifest", str(manifest))
    assert result.returncode == 3, result.stderr  # the first failing app's code
    lines = sorted(result.stdout.decode().splitlines())
    assert lines[0] == "check app " + json.dumps([{"name": "owner", "value": "image"},
                                                 {"name": "role", "value": "reader"}], separators=(",", ":"))
    mem = int(lines[1].split()[-1])
    assert 256 * 1024 < mem < (300 + 64) * 1024  # sized by the pod's memory limit + the guest overhead
    assert lines[2:] == ["check pod " + json.dumps([{"name": "team", "value": "infra"}], separators=(",", ":")),
                         "check pod-flag", "check ro", "greeter replaced pod-flag []"]


def test_bad_pod_manifests_fail_before_a_vm_boots(kvmpod, kvmpod_env, busybox_aci, tmp_path):
    busybox_id = fetch(kvmpod_env, busybox_aci)
    for changes, error in (
            ({"ports": [{"name": "http", "hostPort": 8080}]},
             "--port http: no app of the pod declares a port named 'http' (its apps declare no ports)"),
            ({"apps": [{"name": "a", "image": {"id": busybox_id, "name": "example.com/other"}}]},
             f"app a: image.name 'example.com/other' does not match image {busybox_id[:19]} "
             "(named 'example.com/busybox')")):
        manifest = tmp_path / "pod.json"
        manifest.write_text(json.dumps({**pod_manifest(busybox_id, busybox_id), **changes}))
        result = kvmpod.run("--net", "user", "--pod-manifest", str(manifest))
        assert result.returncode == 125 and the_error(result) == f"kvmpod: error: {error}", result.stderr
