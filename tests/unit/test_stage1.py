"""kvmpod's stage1 without a VM: the entrypoints' argv as rkt's stage0 spells it, the pod directory
stage0 renders (tests/stage0.py makes it), RKT_LOCK_FD, the ACI `make stage1` builds, and what the run
entrypoint refuses before anything starts."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kvmpod.stage1 import build, flags, lock, network, poddir
from kvmpod.stage1 import run as stage1_run
from kvmpod.stage1.flags import NetArg, Stage1Error
from tests.stage0 import App, Stage0

REPO = Path(__file__).resolve().parents[2]
UUID = "0b4c2a8e-5d11-4c3e-9b7a-1f2e3d4c5b6a"


# -- argv ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--debug", "--net=default", "--interactive", "--mds-token=tok", "--local-config=/etc/rkt",
     "--private-users=", "--hostname=web", "--dns-conf-mode=resolv=host,hosts=stage0", UUID],
    ["-debug", "--net", "default", "--interactive=true", "--mds-token", "tok", "--local-config", "/etc/rkt",
     "--hostname", "web", "--dns-conf-mode", "hosts=stage0,resolv=host", "--", UUID],
])
def test_run_flags_in_both_spellings(argv):
    args = flags.parse_run(argv)
    assert (args.uuid, args.debug, args.nets, args.interactive, args.mds_token, args.local_config,
            args.private_users, args.hostname, args.resolv_mode, args.hosts_mode) == \
           (UUID, True, [NetArg("default")], True, "tok", "/etc/rkt", "", "web", "host", "stage0")


def test_run_defaults_and_bool_false():
    args = flags.parse_run(["--debug=false", "--mutable=0", "--disable-seccomp=T", UUID.upper()])
    assert (args.debug, args.mutable, args.disable_seccomp, args.nets, args.local_config, args.uuid) == \
           (False, False, True, [NetArg("default")], "/etc/rkt", UUID)


def test_net_lists_accumulate_and_keep_args():
    args = flags.parse_run(["--net=a,b:IP=10.1.2.3;X=1", "--net=c", UUID])
    assert args.nets == [NetArg("a"), NetArg("b", "IP=10.1.2.3;X=1"), NetArg("c")]


@pytest.mark.parametrize("argv, message", [
    ([UUID, "extra"], "run: one UUID expected after the flags, got"),
    ([], "run: the pod's UUID is missing"),
    (["--bogus", UUID], "run: flag provided but not defined: --bogus"),
    (["--debug=maybe", UUID], "run: invalid boolean value 'maybe' for -debug"),
    (["--hostname"], "run: flag needs an argument: -hostname"),
    (["not-a-uuid"], "run: 'not-a-uuid' is not a UUID"),
    (["--net=a,a", UUID], "network 'a' is given twice"),
    (["--net=host:x=1", UUID], "the special network 'host' takes no arguments"),
    (["--dns-conf-mode=resolv=stage1", UUID], "resolv must be one of host, stage0, none, default"),
    (["--dns-conf-mode=dns=host", UUID], "'dns=host' is not resolv=MODE or hosts=MODE"),
    (["--debug", "false", UUID], "run: one UUID expected after the flags"),   # Go: a bool takes no separate value
])
def test_run_flag_errors_are_one_line(argv, message):
    with pytest.raises(Stage1Error) as e:
        flags.parse_run(argv)
    assert message in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 254


def test_enter_gc_stop():
    assert flags.parse_enter(["--pid=42", "--appname=web", "--", "/bin/sh", "-c", "exit 3"]) == \
        flags.EnterArgs(42, "web", ["/bin/sh", "-c", "exit 3"])
    assert flags.parse_enter(["--pid", "42", "--appname", "web", "ls", "--", "-l"]).command == ["ls", "--", "-l"]
    assert flags.parse_gc(["--debug", "--local-config", "/x", UUID]) == flags.GcArgs(UUID, True, "/x")
    assert flags.parse_gc([UUID]) == flags.GcArgs(UUID, False, "/etc/rkt")
    assert flags.parse_stop(["--force", UUID]) == flags.StopArgs(UUID, True)
    assert flags.parse_stop([UUID]) == flags.StopArgs(UUID, False)
    for argv, message in ((["--appname=a", "--", "sh"], "--pid is missing"), (["--pid=x", "--appname=a", "--", "sh"],
                          "not a process id"), (["--pid=1", "--appname=a", "--"], "no command to run")):
        with pytest.raises(Stage1Error, match=message):
            flags.parse_enter(argv)


# -- the ACI -------------------------------------------------------------------------------------

def test_the_aci_is_valid_and_points_at_its_entrypoints(tmp_path):
    out = tmp_path / "stage1.aci"
    assert build.main(["-o", str(out), "--python", "/opt/kvm pod/bin/python"]) == 0
    with tarfile.open(out) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest"))
        script = tar.extractfile("rootfs/kvmpod/run").read().decode()
        assert all(m.uid == 0 and m.gid == 0 for m in tar.getmembers())
        assert tar.getmember("rootfs/kvmpod/run").mode == 0o755 and tar.getmember("rootfs/rkt/status").isdir()
    assert names[0] == "manifest" and "rootfs/opt" not in names   # opt/stage2 is stage0's
    annotations = {a["name"]: a["value"] for a in manifest["annotations"]}
    for entrypoint in ("run", "enter", "gc", "stop"):
        assert f"rootfs{annotations[f'coreos.com/rkt/stage1/{entrypoint}']}" in names
    assert annotations["coreos.com/rkt/stage1/interface-version"] == "5"
    labels = {la["name"]: la["value"] for la in manifest["labels"]}
    assert labels["os"] == "linux" and labels["arch"] == "amd64" and labels["version"]
    assert "py='/opt/kvm pod/bin/python'" in script and 'exec "$py" -m kvmpod.stage1 run "$@"' in script
    assert out.read_bytes() == build.build_aci("/opt/kvm pod/bin/python")   # reproducible
    # kvmpod's own ACI checks (schema, every member) accept it
    env = {**os.environ, "KVMPOD_STORE_DIR": str(tmp_path / "store")}
    fetched = subprocess.run([sys.executable, "-m", "kvmpod", "fetch", str(out)], capture_output=True, env=env)
    assert fetched.returncode == 0, fetched.stderr.decode()


def test_an_entrypoint_whose_installation_is_gone_says_so(tmp_path):
    script = tmp_path / "run"
    script.write_text(build.entrypoint_script("run", str(tmp_path / "gone" / "python")))
    script.chmod(0o755)
    result = subprocess.run([str(script), UUID], capture_output=True, text=True)
    assert result.returncode == 254
    assert result.stderr == (f"kvmpod-stage1: error: {tmp_path}/gone/python: the kvmpod installation this stage1 "
                             "was built with is gone (rebuild the ACI with make stage1)\n")


def test_all_capabilities_are_the_agents():
    names = re.findall(r'"(CAP_[A-Z_]+)"', (REPO / "guest-agent" / "src" / "caps.c").read_text())
    assert list(stage1_run.ALL_CAPABILITIES) == names


# -- the pod directory ------------------------------------------------------------------------------

@pytest.fixture
def stage0(tmp_path) -> Stage0:
    aci = tmp_path / "stage1.aci"
    aci.write_bytes(build.build_aci(sys.executable))
    return Stage0(tmp_path / "rkt", aci)


@pytest.fixture
def pod(stage0, busybox_aci):
    pod = stage0.prepare([App(busybox_aci, exec="/bin/sh", args=["-c", "exit 3"]),
                          App(busybox_aci, name="two", mounts=[("data", "/data")])],
                         volumes=[{"name": "data", "kind": "empty", "mode": "0755", "uid": 0, "gid": 0}])
    yield pod
    if pod.lock_fd is not None:
        os.close(pod.lock_fd)


def test_stage0s_pod_directory_is_read(pod):
    rkt_pod = poddir.read_pod(pod.path, pod.uuid)
    assert [a.name for a in rkt_pod.apps] == ["busybox", "two"]
    one, two = rkt_pod.apps
    assert one.pod_app.app.exec == ["/bin/sh", "-c", "exit 3"] and one.manifest.name == "example.com/busybox"
    assert one.rootfs == pod.path / "stage1/rootfs/opt/stage2/busybox/rootfs"
    assert rkt_pod.annotations == {"coreos.com/rkt/stage1/mutable": "false"} and not rkt_pod.mutable
    assert [v.name for v in rkt_pod.manifest.volumes] == ["data"] and two.pod_app.mounts[0].target == "/data"
    overrides = stage1_run.app_overrides(one, flags.parse_run([pod.uuid]))
    assert (overrides.rootfs_dir, overrides.image_manifest, overrides.image_id, overrides.image) == \
           (one.rootfs, one.manifest, one.pod_app.image_id, "example.com/busybox")


def test_rkt_extensions_are_understood(pod):
    pm = json.loads(pod.file("pod").read_text())
    pm["apps"][1]["mounts"] = [{"volume": "cache", "path": "/cache", "appVolume": {"name": "cache", "kind": "empty",
                                                                                  "readOnly": None}}]
    pm["apps"][1]["annotations"] = [{"name": "coreos.com/rkt/stage1/stdin", "value": "null"}]
    pm["userAnnotations"] = {"owner": "me"}
    pod.file("pod").write_text(json.dumps(pm))
    rkt_pod = poddir.read_pod(pod.path, pod.uuid)
    assert [v.name for v in rkt_pod.manifest.volumes] == ["data", "cache"]
    assert rkt_pod.apps[1].annotations == {"coreos.com/rkt/stage1/stdin": "null"}


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.file("pod").write_text("{not json"), "/pod: not a pod manifest: invalid JSON"),
    (lambda p: p.file("pod").unlink(), "/pod: No such file or directory (stage0 writes the pod manifest there)"),
    (lambda p: p.file("pod").write_text('{"acKind": "PodManifest", "acVersion": "1.30.0", "apps": []}'),
     "/pod: pod manifest: apps: [] is"),
    (lambda p: subprocess.run(["rm", "-rf", str(p.file("stage1/rootfs/opt/stage2/two/rootfs"))], check=True),
     "app two: {path}/stage1/rootfs/opt/stage2/two/rootfs: no such directory (stage0 renders each app's rootfs there)"),
    (lambda p: (subprocess.run(["rm", "-rf", str(p.file("stage1/rootfs/opt/stage2/two/rootfs"))], check=True),
                p.file("stage1/rootfs/opt/stage2/two/rootfs").symlink_to("/")),
     "stage2/two/rootfs: not a directory"),
    (lambda p: p.file("stage1/rootfs/opt/stage2/busybox/manifest").write_text('{"acKind": "ImageManifest"}'),
     "stage2/busybox/manifest: manifest:"),
    (lambda p: p.file("stage1/rootfs/opt/stage2/busybox/manifest").write_text(json.dumps(
        {**json.loads(p.file("stage1/rootfs/opt/stage2/busybox/manifest").read_text()),
         "labels": [{"name": "os", "value": "linux"}, {"name": "arch", "value": "arm64"}]})),
     "stage2/busybox/manifest: "),
])
def test_a_bad_pod_directory_is_one_line(pod, damage, message):
    damage(pod)
    with pytest.raises(Stage1Error) as e:
        poddir.read_pod(pod.path, pod.uuid)
    assert message.format(path=pod.path) in str(e.value) and "\n" not in str(e.value)


def test_status_pid_and_ready_files(pod):
    rkt_pod = poddir.read_pod(pod.path, pod.uuid)
    rkt_pod.write_pid(1234)
    rkt_pod.write_status("busybox", 3)
    rkt_pod.write_status("two", 137)
    rkt_pod.mark_ready()
    assert Stage0.statuses(pod) == {"busybox": 3, "two": 137}
    assert pod.file("pid").read_text() == "1234"
    assert os.readlink(pod.file("stage1/rootfs/rkt/supervisor-status")) == "ready"
    rkt_pod.record(Path("/run/kvmpod/pods") / pod.uuid)
    assert poddir.read_record(pod.path) == Path("/run/kvmpod/pods") / pod.uuid


# -- RKT_LOCK_FD ----------------------------------------------------------------------------------

def test_the_lock_fd_is_checked_and_kept_close_on_exec(pod, tmp_path):
    fd = pod.lock_fd
    os.set_inheritable(fd, True)
    assert lock.hold_pod_lock(pod.path, {"RKT_LOCK_FD": str(fd)}) == fd
    assert not os.get_inheritable(fd) and Stage0.running(pod)
    for env, message in (({}, "RKT_LOCK_FD is not set"), ({"RKT_LOCK_FD": "x"}, "is not a file descriptor number"),
                         ({"RKT_LOCK_FD": "987"}, "RKT_LOCK_FD=987 is not an open file descriptor")):
        with pytest.raises(Stage1Error, match=message):
            lock.hold_pod_lock(pod.path, env)
    other = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Stage1Error, match="is not the pod directory"):
            lock.hold_pod_lock(pod.path, {"RKT_LOCK_FD": str(other)})
    finally:
        os.close(other)
    fcntl.flock(fd, fcntl.LOCK_UN)
    with pytest.raises(Stage1Error, match="is not locked"):
        lock.hold_pod_lock(pod.path, {"RKT_LOCK_FD": str(fd)})


# -- what run refuses, and how it asks for the network ----------------------------------------------

def test_unsupported_run_flags_are_refused(pod):
    rkt_pod = poddir.read_pod(pod.path, pod.uuid)
    for argv, message in ((["--private-users=100000:65536"], "user namespaces do not apply"),
                          (["--mutable"], "mutable pods"), (["--interactive"], r"exactly one app \(this one has 2\)")):
        with pytest.raises(Stage1Error, match=message):
            stage1_run.check_supported(flags.parse_run([*argv, pod.uuid]), rkt_pod)


@pytest.mark.parametrize("net, expected", [
    ("none", ("none", ())), ("default", ("default", ())), ("a,b", ("cni", ("a", "b"))),
])
def test_networks(net, expected, tmp_path):
    req = network.net_request(flags.parse_run([f"--net={net}", UUID]), tmp_path, [])
    assert (req.mode, req.cni_networks) == expected
    assert req.cni_config_dirs == (("/etc/rkt/net.d", "/usr/lib/rkt/net.d") if req.mode == "cni" else ())


def test_cni_networks_are_looked_up_in_rkts_config_dirs(tmp_path):
    from kvmpod.net.cni import load_network

    local = tmp_path / "etc-rkt"
    (local / "net.d").mkdir(parents=True)
    for i, name in enumerate(("front", "back")):
        (local / "net.d" / f"{i}0-{name}.conf").write_text(json.dumps(
            {"cniVersion": "0.4.0", "name": name, "type": "bridge", "ipam": {"type": "host-local"}}))
    req = network.net_request(flags.parse_run([f"--local-config={local}", "--net=all", UUID]), tmp_path, [])
    assert (req.mode, req.cni_networks) == ("cni", ("front", "back"))
    assert load_network("back", [Path(d) for d in req.cni_config_dirs]).name == "back"
    with pytest.raises(Stage1Error, match="--net=all: no CNI network configs in"):
        network.net_request(flags.parse_run([f"--local-config={tmp_path / 'none'}", "--net=all", UUID]),
                            tmp_path, [])


@pytest.mark.parametrize("net, message", [
    ("host", "--net=host: a pod VM cannot share the host's network namespace"),
    ("a:IP=1.2.3.4", "per-network CNI_ARGS are not supported"),
    ("default,a", "'default' cannot be combined with other networks"),
    ("user", "not an rkt network"),
])
def test_network_refusals(net, message, tmp_path):
    with pytest.raises(Stage1Error, match=re.escape(message)):
        network.net_request(flags.parse_run([f"--net={net}", UUID]), tmp_path, [])


def test_dns_conf_modes(stage0, busybox_aci):
    pod = stage0.prepare([App(busybox_aci)], dns=["10.0.0.53"], hosts_entries=[("10.0.0.7", "db")])
    os.close(pod.lock_fd)
    req = network.net_request(flags.parse_run(["--net=none", "--dns-conf-mode=resolv=stage0,hosts=stage0", UUID]),
                              pod.path, [])
    assert req.dns == ("10.0.0.53",)
    assert "10.0.0.7 db" in req.hosts_entries and "127.0.0.1 localhost.localdomain" in req.hosts_entries
    req = network.net_request(flags.parse_run(["--dns-conf-mode=resolv=host,hosts=host", "--net=none", UUID]),
                              pod.path, [])
    assert (req.dns, req.hosts_entries) == (("host",), ("host",))
    with pytest.raises(Stage1Error, match="rkt-resolv.conf: No such file"):
        network.net_request(flags.parse_run(["--dns-conf-mode=resolv=stage0", UUID]), pod.path.parent, [])


def test_hostname_default_is_rkts():
    assert stage1_run.pod_hostname(flags.parse_run([UUID])) == f"rkt-{UUID}"
    with pytest.raises(Stage1Error, match="--hostname"):
        stage1_run.pod_hostname(flags.parse_run(["--hostname=no_underscores", UUID]))


def test_disable_flags_lift_isolators(pod):
    from kvmpod.image.manifest import Isolator

    app = poddir.read_pod(pod.path, pod.uuid).apps[0]
    app = poddir.with_app(app, app=app.manifest.app.__class__(
        exec=["/bin/true"], user="0", group="0",
        isolators=[Isolator("os/linux/seccomp-remove-set", {"set": ["reboot"]}),
                   Isolator("os/linux/capabilities-retain-set", {"set": ["CAP_KILL"]}),
                   Isolator("os/linux/no-new-privileges", True)]))
    lifted = stage1_run.app_object(app, flags.parse_run(["--disable-seccomp", "--disable-capabilities-restriction",
                                                         UUID]))
    assert [i.name for i in lifted.isolators] == ["os/linux/no-new-privileges", "os/linux/capabilities-retain-set"]
    assert lifted.isolators[1].value["set"] == list(stage1_run.ALL_CAPABILITIES)
    assert stage1_run.app_object(app, flags.parse_run([UUID])) is app.pod_app.app


# -- the entrypoints' own failures ---------------------------------------------------------------------

@pytest.mark.parametrize("argv, env, message", [
    (["run", UUID], {}, "kvmpod-stage1: error: RKT_LOCK_FD is not set: stage0 passes the pod directory's locked fd "
                        "in it"),
    (["run", "--bogus", UUID], {}, "kvmpod-stage1: error: run: flag provided but not defined: --bogus"),
    (["launch"], {}, "kvmpod-stage1: error: usage: python -m kvmpod.stage1 run|enter|stop|gc ARGS..."),
    (["enter", "--pid=1", "--appname=a", "--", "/bin/true"], {},
     "kvmpod-stage1: error: enter: {cwd}: the pod is not running (no kvmpod pod for it)"),
])
def test_entrypoint_failures_are_one_line_and_254(tmp_path, argv, env, message):
    environ = {k: v for k, v in os.environ.items() if k != "RKT_LOCK_FD"}
    environ["KVMPOD_RUN_DIR"] = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "kvmpod.stage1", *argv], cwd=tmp_path, capture_output=True,
                            text=True, env={**environ, **env})
    assert (result.returncode, result.stderr) == (254, message.format(cwd=tmp_path) + "\n")


def test_stop_and_gc_of_a_pod_that_left_nothing_succeed(tmp_path):
    env = {**os.environ, "KVMPOD_RUN_DIR": str(tmp_path / "run")}
    for argv in (["stop", UUID], ["stop", "--force", UUID], ["gc", "--debug", "--local-config", "/x", UUID]):
        result = subprocess.run([sys.executable, "-m", "kvmpod.stage1", *argv], cwd=tmp_path, capture_output=True,
                                env=env)
        assert result.returncode == 0, result.stderr
