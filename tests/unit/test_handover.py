"""The hand-over record (kvmpod/pod/handover.py, docs/relay.md): a realistic RelayState round-trips
byte for byte, and every record this code cannot read is a HandoverError with what could be read of
its envelope, never a traceback. The schema fingerprint ties HANDOVER_VERSION to the body's dataclasses."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from kvmpod.agent.isolators import Isolators
from kvmpod.agent.session import ExitStatus, Hello
from kvmpod.errors import EXIT_KVMPOD_FAILURE, KvmpodError
from kvmpod.image.manifest import App, EnvVar, ImageManifest, Isolator, MountPoint, Port
from kvmpod.net.attach import PodNetwork
from kvmpod.net.spec import Attachment, DnsConfig, GuestInterface, GuestNetwork, NetRequest, PortRequest, Route
from kvmpod.pod import handover, resume
from kvmpod.pod.handover import (HANDOVER_FORMAT, HANDOVER_VERSION, AppProcess, Envelope, HandoverError, RelayState,
                                 decode_record, encode_record, read_record, write_record)
from kvmpod.pod.options import RunOptions
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.spec import ProcessExtras, ResolvedApp
from kvmpod.pod.volumes import AppMount, Mount, PodVolumes, Volume
from kvmpod.store.stored import StoredImage
from kvmpod.vm.config import Disk, Nic, NinePShare, VMConfig
from kvmpod.vm.qemu import QemuHandover

# The body's schema (handover.body_schema()) as of HANDOVER_VERSION. Change a dataclass the record
# holds and this fails: bump HANDOVER_VERSION, then record the new fingerprint here.
SCHEMA_FINGERPRINTS = {
    1: "80b48538ee565110a1b577c616a311d7ee9e16feeb9d61af31dabffa7cf9bde1",
    2: "ad484a60dc258da8d69b4bcf74d8e86f310ec435d7eae7ba1af99fee71524e1a",   # VMConfig.confinement
    # RunOptions.transfer, timeout, backend, libvirt_uri; Volume.owner; Nic.tap_name
    3: "c36d331056901b388faf7aac41c414f0b4231ff30dc3c8a9b5b8abc8b56659b5",
    4: "03ed67b3913765908754ac55e8d2637899267b3dd0a7fec2a7d1c9fbb23698cc",   # Nic.placeholder
}


def realistic_state(tmp_path: Path) -> RelayState:
    """A two-app pod on a user-mode network with volumes, as runner.relay_record() makes one."""
    pod_path = tmp_path / "pods" / "1b2c3d4e-0000-4000-8000-000000000001"
    pod = PodDir("1b2c3d4e-0000-4000-8000-000000000001", pod_path,
                 {"uuid": "1b2c3d4e-0000-4000-8000-000000000001", "state": "running", "created": 1765000000.25,
                  "kvmpod_pid": 4242, "kvmpod_start": 987654, "qemu_pid": 4243, "boot": "cold",
                  "apps": [{"name": "web", "image": "sha512-" + "ab" * 64}], "networks": []})
    manifest = ImageManifest(
        "example.com/web", {"version": "1.0", "os": "linux", "arch": "amd64"},
        App(["/bin/httpd", "-f"], "0", "0", "/srv", [EnvVar("LANG", "C.UTF-8")], [10, 20],
            {"pre-start": ["/bin/prepare"]}, [Isolator("resource/memory", {"limit": "128M"})],
            [MountPoint("data", "/data", True)], [Port("http", "tcp", 80)]),
        {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/web", "x": [1, 2.5, None, "é"]},
        {"note": "ünïcode"})
    image = StoredImage("sha512-" + "ab" * 64, tmp_path / "blobs" / "web.tar", manifest, "verified")
    data = Volume("data", "empty", mode=0o700, uid=1, gid=2)
    host = Volume("src", "host", "/srv/a,b=c", read_only=True)
    web = ResolvedApp("web", image, tmp_path / "disks" / "web.img", "img0", ["/bin/httpd", "-f"],
                      ["PATH=/bin", "AC_APP_NAME=web"], "/srv", "0", "0", [10, 20], False,
                      {"pre-start": ["/bin/prepare"]},
                      Isolators(caps_retain=("CAP_CHOWN", "CAP_NET_BIND_SERVICE"), no_new_privileges=True),
                      ["os/linux/selinux-context"], [Isolator("resource/memory", {"limit": "128M"})],
                      {"app": "annotation"}, [AppMount(data, "/data", False), AppMount(host, "/src", True)],
                      [MountPoint("data", "/data", True)], [Mount("data", "/data")], False,
                      ProcessExtras(rlimits=((7, 1024, 4096),), oom_score_adj=-100))
    sidecar = ResolvedApp("sidecar", image, tmp_path / "disks" / "web.img", "img1", ["/bin/sh"], [], "/", "1", "1",
                          [], True)
    options = RunOptions(memory_mib=256, cpus=2, annotations={"a": "b"}, pod_isolators=[Isolator("x/y", [1])],
                         debug=False, keep=False, detach=True, pod_env={"E": "1"}, kernel_args=["quiet"],
                         volumes=[data, host],
                         network=NetRequest(mode="user", ports=(PortRequest("http", 8080),), dns=("1.1.1.1",)),
                         output_fds=(1, 2))
    interface = GuestInterface("02:00:00:00:00:01", "eth0", 1500, ("10.0.2.15/24",), (Route("0.0.0.0/0", "10.0.2.2"),))
    network = PodNetwork(pod_path, [Attachment("user", interface, {"kind": "user"}, None,
                                               ("hostfwd=tcp::8080-:80",))],
                         GuestNetwork([interface], DnsConfig(("1.1.1.1",)), ["10.0.2.2 host"]))
    config = VMConfig("kvmpod-1b2c3d4e", tmp_path / "vmlinuz", tmp_path / "initrd", "console=ttyS0 quiet",
                      pod_path / "console.log", qmp_fd=5, agent_fd=6, machine="microvm",
                      machine_options=("acpi=off",), memory_mib=256, cpus=2,
                      disks=[Disk(tmp_path / "disks" / "web.img", "img0")],
                      shares_9p=[NinePShare("kvmpodvol0", Path("/srv/a,b=c"), True, "passthrough")],
                      nics=[Nic("02:00:00:00:00:01", None, ("hostfwd=tcp::8080-:80",))])
    qemu = QemuHandover(config, pod_path / "qemu.log", 60.0, 4243, 5, False, None)
    return RelayState(pod, [web, sidecar], options, {"start": 1765000000.125, "apps_started": 1765000001.5},
                      "kvmpod-1b2c3d4e", PodVolumes([data, host], "9p"), network, qemu, Hello(3, "0.1.0", 123456789),
                      3, {1}, [AppProcess(1, 11, None, 7, 7, True), AppProcess(2, 12, ExitStatus(signal=15), 8, 8, True)],
                      9, 10, (11, 12), {8}, 2)


def test_a_realistic_state_round_trips_byte_for_byte(tmp_path):
    state = realistic_state(tmp_path)
    data = encode_record(state)
    back = decode_record(data)
    assert back == state
    assert encode_record(back) == data
    record = json.loads(data)
    assert (record["format"], record["version"]) == (HANDOVER_FORMAT, HANDOVER_VERSION)
    assert record["pod"] == {"uuid": state.pod.uuid, "path": str(state.pod.path)}
    assert (record["qemu_pid"], record["keep"], record["detach"], record["debug"]) == (4243, False, True, False)
    assert record["body"]["finished"] == [1] and record["body"]["options"]["on_started"] is None
    assert isinstance(back.claim_fds, tuple) and isinstance(back.finished, set)
    assert isinstance(back.apps[0].disk, Path) and back.apps[0].extras.rlimits == ((7, 1024, 4096),)


def test_undecodable_path_bytes_and_non_ascii_survive(tmp_path):
    state = realistic_state(tmp_path)
    odd = Path(os.fsdecode(b"/srv/caf\xe9/\xc3\xa9t\xc3\xa9"))
    state.apps[0] = dataclasses.replace(state.apps[0], disk=odd)
    data = encode_record(state)
    data.decode("ascii")
    assert decode_record(data).apps[0].disk == odd


def test_through_a_memfd(tmp_path):
    state = realistic_state(tmp_path)
    assert read_record(write_record(state)) == state


def test_a_callback_in_the_options_is_refused(tmp_path):
    state = realistic_state(tmp_path)
    state.options = dataclasses.replace(state.options, on_started=print)
    with pytest.raises(HandoverError, match="callback"):
        encode_record(state)


def record_of(tmp_path: Path) -> dict:
    return json.loads(encode_record(realistic_state(tmp_path)))


def expect_error(data: bytes, match: str) -> HandoverError:
    with pytest.raises(HandoverError, match=match) as caught:
        decode_record(data)
    error = caught.value
    assert isinstance(error, KvmpodError) and error.exit_code == EXIT_KVMPOD_FAILURE
    assert "\n" not in str(error)
    return error


def test_an_unknown_version_names_both_and_keeps_the_envelope(tmp_path):
    record = record_of(tmp_path)
    record["version"] = 999
    record["body"] = {"something": "else entirely"}
    error = expect_error(json.dumps(record).encode(), "version 999")
    assert str(error) == (f"the pod's hand-over record is version 999, this kvmpod reads version {HANDOVER_VERSION} "
                          "(kvmpod was changed while the pod was idle)")
    assert error.envelope == Envelope(999, record["pod"]["uuid"], Path(record["pod"]["path"]), 4243, False, True,
                                      True, False, "user")


@pytest.mark.parametrize("data", [b"\x80\x04\x95 a pickle", b"", b"{\"format\": ", "{}".encode()])
def test_not_a_record(data):
    error = expect_error(data, "is not a kvmpod hand-over record")
    assert error.envelope is None


def test_another_format(tmp_path):
    record = record_of(tmp_path)
    record["format"] = "someone-elses"
    assert expect_error(json.dumps(record).encode(), "is not a kvmpod hand-over record").envelope is None


def test_a_broken_envelope(tmp_path):
    record = record_of(tmp_path)
    record["qemu_pid"] = "4243"
    assert expect_error(json.dumps(record).encode(), "no valid envelope field qemu_pid").envelope is None


def test_a_body_missing_a_field(tmp_path):
    record = record_of(tmp_path)
    del record["body"]["hello"]["agent_version"]
    error = expect_error(json.dumps(record).encode(), "does not fit this kvmpod: required field missing @ body.hello.agent_version")
    assert error.envelope is not None and error.envelope.qemu_pid == 4243
    assert error.__cause__ is not None  # cattrs' own error, for --debug
    # a field with a default is no less required: this code writes every field
    record = record_of(tmp_path)
    del record["body"]["options"]["keep"]
    error = expect_error(json.dumps(record).encode(), "does not fit this kvmpod: required field missing @ body.options.keep")
    assert error.envelope is not None


def test_a_body_with_a_wrong_type_or_an_unknown_field(tmp_path):
    record = record_of(tmp_path)
    record["body"]["processes"][0]["pid"] = "eleven"
    expect_error(json.dumps(record).encode(), r"does not fit this kvmpod: .*@ body.processes\[0\].pid")
    record = record_of(tmp_path)
    record["body"]["options"]["debug"] = "false"  # cattrs alone would make it True
    expect_error(json.dumps(record).encode(), r"does not fit this kvmpod: invalid value for type, expected bool @ body.options.debug")
    record = record_of(tmp_path)
    record["body"]["hello"]["new_field"] = 1
    expect_error(json.dumps(record).encode(), "does not fit this kvmpod: .*new_field")


def test_an_envelope_that_contradicts_its_body(tmp_path):
    record = record_of(tmp_path)
    record["qemu_pid"] = 1
    assert expect_error(json.dumps(record).encode(), "contradicts itself").envelope.qemu_pid == 1


def test_the_body_schema_is_the_version_it_claims():
    schema = handover.body_schema()
    fingerprint = hashlib.sha256(schema.encode()).hexdigest()
    assert fingerprint == SCHEMA_FINGERPRINTS[HANDOVER_VERSION], (
        f"the hand-over record's body changed (a dataclass it holds: kvmpod/pod/handover.py body_schema()) but "
        f"HANDOVER_VERSION is still {HANDOVER_VERSION}. A pod relayed by the old code would be read by the new: "
        f"bump HANDOVER_VERSION in kvmpod/pod/handover.py, say what changed in docs/relay.md, and record "
        f"SCHEMA_FINGERPRINTS[{HANDOVER_VERSION + 1}] = {fingerprint!r} in tests/unit/test_handover.py. "
        f"The body's schema now:\n{schema}")


def test_the_schema_sees_a_changed_field(monkeypatch):
    before = handover.body_schema()
    fields = dict(ExitStatus.__annotations__)
    monkeypatch.setattr(ExitStatus, "__annotations__", {**fields, "code": "str | None"})
    assert handover.body_schema() != before


def test_the_schema_covers_every_dataclass_of_the_body():
    names = {c.__qualname__ for c in handover.record_classes()}
    assert {"RelayState", "PodDir", "ResolvedApp", "StoredImage", "ImageManifest", "App", "RunOptions", "NetRequest",
            "Volume", "Isolator", "PodVolumes", "PodNetwork", "Attachment", "QemuHandover", "VMConfig", "Nic", "Hello",
            "ExitStatus", "AppProcess", "Isolators", "ProcessExtras"} <= names


# -- the way back with a record it cannot read (kvmpod/pod/resume.py), without a VM ----------------

@pytest.fixture
def relayed_pod(tmp_path, monkeypatch):
    """A pod directory this process owns, `running`, and a child standing in for its QEMU."""
    monkeypatch.setenv("KVMPOD_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("KVMPOD_AUDIT_LOG", str(tmp_path / "audit.log"))
    pod = PodDir.create(tmp_path / "run")
    pod.update(state="running", apps=[{"name": "web"}], host_process="kvmpod-relay")
    qemu = subprocess.Popen(["sleep", "60"])
    yield pod, qemu
    if qemu.poll() is None:
        qemu.kill()
        qemu.wait()


def audit_ends(tmp_path: Path) -> list[str]:
    return [r["state"] for r in map(json.loads, (tmp_path / "audit.log").read_text().splitlines()) if r["event"] == "end"]


@pytest.mark.parametrize("keep", [False, True])
def test_the_pod_of_an_unknown_version_ends_as_a_failed_pod(relayed_pod, tmp_path, keep):
    pod, qemu = relayed_pod
    envelope = Envelope(2, pod.uuid, pod.path, qemu.pid, keep, False, True, False, "none")
    reported = resume.end_unread_pod(HandoverError("the record is version 2", envelope), None)
    assert not Path(f"/proc/{qemu.pid}").exists()  # killed and reaped
    assert audit_ends(tmp_path) == ["failed"]
    if keep:
        assert str(reported) == f"the record is version 2: the pod was stopped (pod directory kept: {pod.path})"
        state = json.loads((pod.path / "state.json").read_text())
        assert (state["state"], state["host_process"], state["error"]) == (
            "failed", "kvmpod", "the record is version 2: the pod was stopped")
    else:
        assert str(reported) == "the record is version 2: the pod was stopped"
        assert not pod.path.exists()


def test_without_an_envelope_the_pod_is_found_by_its_owner_and_kept(relayed_pod, tmp_path, monkeypatch):
    pod, qemu = relayed_pod
    other = PodDir.create(tmp_path / "run")   # another process's pod: untouched
    other.update(kvmpod_pid=1, kvmpod_start=1)
    monkeypatch.setattr(resume, "_children", lambda: {qemu.pid})  # not every child of the test runner
    reported = resume.end_unread_pod(HandoverError("not a record"), None)
    assert not Path(f"/proc/{qemu.pid}").exists()
    assert str(reported) == f"not a record: the pod was stopped (pod directory kept: {pod.path})"
    assert json.loads((pod.path / "state.json").read_text())["state"] == "failed"
    assert json.loads((other.path / "state.json").read_text())["state"] == "preparing"


def test_resume_reports_one_line_and_exits_125(relayed_pod, tmp_path, monkeypatch, capsys):
    pod, qemu = relayed_pod
    record = json.loads(encode_record(realistic_state(tmp_path)))
    record.update(version=999, pod={"uuid": pod.uuid, "path": str(pod.path)}, qemu_pid=qemu.pid, detach=False)
    state_fd = handover.memfd("state", json.dumps(record).encode())
    unread_fd = handover.memfd("unread", b"")
    exits: list[int] = []
    monkeypatch.setattr(resume, "exit_now", exits.append)
    resume.main(["--state", str(state_fd), "--unread", str(unread_fd), "--why", "signal", "--signal", "15",
                 "--pod", str(pod.path)])
    os.close(unread_fd)
    assert exits == [EXIT_KVMPOD_FAILURE]
    err = capsys.readouterr().err
    assert err == (f"kvmpod: error: the pod's hand-over record is version 999, this kvmpod reads version "
                   f"{HANDOVER_VERSION} (kvmpod was changed while the pod was idle): the pod was stopped\n")
    assert not pod.path.exists() and not Path(f"/proc/{qemu.pid}").exists()
