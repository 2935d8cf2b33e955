"""Pod flags end to end: --hostname, --annotation, --uuid-file-save, VM sizing from resource isolators,
and the audit log's start and end records. Real VMs."""

from __future__ import annotations

import json
from pathlib import Path

from kvmpod.image.build import build_aci
from kvmpod.image.manifest import Isolator, build_manifest

# busybox wget prints the body to stdout with -O-; the metadata URL comes from the environment
SHOW = ('hostname; echo "mem $(sed -n "s/^MemTotal: *\\([0-9]*\\) kB/\\1/p" /proc/meminfo)"; '
        'echo "cpus $(grep -c ^processor /proc/cpuinfo)"; '
        'wget -q -O- "$AC_METADATA_URL/acMetadata/v1/pod/annotations"; echo; exit 3')


def audit_records(env: dict[str, str], uuid: str) -> list[dict]:
    lines = Path(env["KVMPOD_AUDIT_LOG"]).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["uuid"] == uuid]


def test_hostname_annotations_uuid_file_and_the_audit_log(kvmpod, kvmpod_env, busybox_aci, tmp_path):
    uuid_file = tmp_path / "uuid"
    result = kvmpod.run("--hostname", "web.example", "--annotation", "team=infra", "--annotation", "tier=1",
                        "--uuid-file-save", str(uuid_file), str(busybox_aci), "--exec", "/bin/sh", "--", "-c", SHOW)
    assert result.returncode == 3, result.stderr
    hostname, mem, cpus, annotations = result.stdout.decode().splitlines()
    assert hostname == "web.example" and cpus == "cpus 1"
    assert 200_000 < int(mem.split()[1]) < 256 * 1024  # the default 256 MiB, less what the kernel keeps
    assert json.loads(annotations) == [{"name": "team", "value": "infra"}, {"name": "tier", "value": "1"}]
    uuid = uuid_file.read_text()
    start, end = audit_records(kvmpod_env, uuid)
    assert start["event"] == "start" and start["user"]["uid"] == 0 and start["host"]
    [app] = start["apps"]
    assert app["image_name"] == "example.com/busybox" and app["image"].startswith("sha512-")
    assert app["signature"] == "unsigned"
    assert end["event"] == "end" and end["state"] == "exited" and end["apps"][0]["exit_code"] == 3


def test_default_hostname_and_a_vm_sized_by_the_apps_memory_limit(kvmpod, kvmpod_env, busybox_rootfs, tmp_path):
    manifest = build_manifest("example.com/big", exec_=["/bin/sh", "-c", SHOW],
                              isolators=[Isolator("resource/memory", {"limit": "512Mi"})])
    aci = tmp_path / "big.aci"
    build_aci(busybox_rootfs, manifest, aci)
    uuid_file = tmp_path / "uuid"
    result = kvmpod.run("--uuid-file-save", str(uuid_file), str(aci))
    assert result.returncode == 3, result.stderr
    hostname, mem, _cpus, annotations = result.stdout.decode().splitlines()
    assert hostname == f"kvmpod-{uuid_file.read_text()[:8]}" and json.loads(annotations) == []
    assert 512 * 1024 < int(mem.split()[1]) < (512 + 64) * 1024  # 512 MiB + the guest overhead
    # --memory wins, with a notice that it undercuts the app's limit
    result = kvmpod.run("--memory", "256M", str(aci))
    assert result.returncode == 3
    assert int(result.stdout.decode().splitlines()[1].split()[1]) < 256 * 1024
    assert "kvmpod: notice: --memory 256M is below the 576 MiB the apps' memory limits need" in result.stderr.decode()


def test_bad_pod_flags_are_one_line_usage_errors(kvmpod, busybox_aci):
    for flags, problem in ((["--hostname", "bad host"], "is not a host name"),
                           (["--annotation", "Bad_Name=x"], "is not an AC Name"),
                           (["--annotation", "a=1", "--annotation", "a=2"], "'a' is given twice")):
        result = kvmpod.run(*flags, str(busybox_aci))
        assert result.returncode == 125 and problem in result.stderr.decode(), (flags, result.stderr)


def test_two_apps_share_processes_and_localhost_but_not_their_rootfs(kvmpod, busybox_aci):
    server = "touch /tmp/a-only; echo from-a | nc -l -p 7000; echo a-done"
    client = ("sleep 1; pidof nc >/dev/null && echo sees-a-process; nc 127.0.0.1 7000 </dev/null; "
              "test -e /tmp/a-only && echo sees-a-rootfs || echo own-rootfs; echo $AC_APP_NAME; exit 4")
    result = kvmpod.run(str(busybox_aci), "--name", "a", "--exec", "/bin/sh", "--", "-c", server,
                        "---", str(busybox_aci), "--name", "b", "--exec", "/bin/sh", "--", "-c", client)
    # the pod runs until both apps are done and exits with the first failing app's code
    assert result.returncode == 4, result.stderr
    lines = result.stdout.decode().splitlines()
    assert [x for x in lines if x != "a-done"] == ["sees-a-process", "from-a", "own-rootfs", "b"]
    assert "a-done" in lines
