"""config.json → the pod (kvmpod/oci_runtime/bundle.py, container.pod_for): what maps where, and bad
bundles refused in one line naming the field, before anything exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpod.oci_runtime import bundle as b
from kvmpod.oci_runtime.container import parse_signal, pod_for
from kvmpod.oci_runtime.records import Container, Records


def _config(rootfs: str = "rootfs", **over) -> dict:
    config = {
        "ociVersion": "1.0.2-dev",
        "process": {"args": ["/bin/sh", "-c", "echo hi"], "env": ["PATH=/bin", "FOO=bar"], "cwd": "/srv",
                    "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000]}, "terminal": False,
                    "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"]}, "noNewPrivileges": True,
                    "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}], "oomScoreAdj": 100},
        "root": {"path": rootfs, "readonly": True},
        "hostname": "abc123",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}, {"type": "mount"}],
                  "resources": {"memory": {"limit": 512 << 20}, "cpu": {"quota": 150000, "period": 100000}}},
    }
    for key, value in over.items():
        config[key] = value
    return config


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    (tmp_path / "rootfs").mkdir()
    return tmp_path


def _write(bundle: Path, config) -> Path:
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_the_process_root_resources_and_network_are_read(bundle_dir):
    bundle = b.read_bundle(_write(bundle_dir, _config()))
    assert bundle.rootfs == (bundle_dir / "rootfs").resolve() and bundle.readonly_rootfs
    assert bundle.args == ["/bin/sh", "-c", "echo hi"] and bundle.cwd == "/srv"
    assert (bundle.uid, bundle.gid, bundle.additional_gids) == (1000, 1000, [2000])
    assert bundle.capabilities == ("CAP_CHOWN", "CAP_KILL") and bundle.no_new_privileges
    assert bundle.rlimits == ((7, 1024, 4096),) and bundle.oom_score_adj == 100
    assert bundle.memory_mib == 512 and bundle.cpus == 2   # 1.5 CPUs of quota: 2 vCPUs
    assert bundle.netns == "/run/netns/x" and bundle.hostname == "abc123"
    assert bundle.binds == [] and bundle.tmpfs == []   # /proc and /dev are the guest's own


def test_bind_mounts_of_directories_and_files_and_tmpfs(bundle_dir, tmp_path_factory):
    host = tmp_path_factory.mktemp("host")
    (host / "hosts").write_text("127.0.0.1 localhost\n")
    mounts = [{"destination": "/data", "type": "bind", "source": str(host), "options": ["ro", "rbind"]},
              {"destination": "/etc/hosts", "type": "bind", "source": str(host / "hosts"), "options": ["bind"]},
              {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1700"]}]
    bundle = b.read_bundle(_write(bundle_dir, _config(mounts=mounts)))
    assert bundle.binds == [b.BindMount("/data", host.resolve(), True, False),
                            b.BindMount("/etc/hosts", (host / "hosts").resolve(), False, True)]
    assert bundle.tmpfs == [b.TmpfsMount("/scratch", 0o1700)]
    container = Container("c1", tmp_path_factory.mktemp("state"))
    app, options = pod_for(bundle, container)
    assert (container.file("files") / "f0").read_text() == "127.0.0.1 localhost\n"   # a copy, bound over
    volumes = {v.name: v for v in options.volumes}
    assert volumes["oci-bind0"].source == str(host.resolve()) and volumes["oci-bind0"].read_only
    assert volumes["oci-files"].source == str(container.file("files"))
    assert volumes["oci-tmpfs0"].kind == "empty" and volumes["oci-tmpfs0"].mode == 0o1700
    assert [(m.volume, m.target, m.file) for m in app.mounts] == [
        ("oci-bind0", "/data", ""), ("oci-files", "/etc/hosts", "f0"), ("oci-tmpfs0", "/scratch", "")]
    assert app.rootfs_dir == bundle.rootfs and app.readonly_rootfs and app.extras.keep_etc
    assert app.extras.rlimits == ((7, 1024, 4096),) and app.extras.seccomp_skip_unknown
    assert options.hold_apps and options.interactive and options.network.mode == "netns"
    assert options.memory_mib == 512 and options.cpus == 2 and options.hostname == "abc123"
    assert app.app is not None and app.app.user == "1000" and app.app.working_directory == "/srv"
    names = {i.name for i in app.app.isolators}
    assert names == {"os/linux/capabilities-retain-set", "os/linux/no-new-privileges"}


def test_a_new_network_namespace_is_loopback_only(bundle_dir, tmp_path):
    config = _config()
    config["linux"]["namespaces"] = [{"type": "network"}]
    bundle = b.read_bundle(_write(bundle_dir, config))
    _, options = pod_for(bundle, Container("c1", tmp_path))
    assert bundle.netns == "" and options.network.mode == "none"


def test_seccomp_allow_list_and_deny_list():
    allow = b._seccomp({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": [
        {"names": ["read", "write", "chown32"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO"},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_MASKED_EQ"}]}]})
    assert allow == b.Seccomp(retain=("read", "write", "chown32", "clone"), errno="EPERM", ignored_conditions=1)
    deny = b._seccomp({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["reboot"], "action": "SCMP_ACT_KILL"},
        {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}]})
    assert deny == b.Seccomp(remove=("reboot",), errno="EPERM", ignored_conditions=1)


@pytest.mark.parametrize("change, message", [
    ({"ociVersion": "2.0.0"}, r"config.json: ociVersion: '2.0.0': kvmpod serves runtime-spec 1.x"),
    ({"ociVersion": None}, r"config.json: ociVersion: null is not a string"),
    ({"hostname": "a b quiet init=/bin/sh"}, r"config.json: hostname: 'a b quiet init=/bin/sh' is not a host name"),
    ({"root": {"path": "missing"}}, r"config.json: root.path: .*missing: No such file or directory"),
    ({"root": {"path": "file"}}, r"config.json: root.path: .*file is not a directory"),
    ({"process": {"args": []}}, r"config.json: process.args: empty: nothing to run"),
    ({"process": {"args": ["bin/sh"]}}, r"config.json: process.args: 'bin/sh': a relative path"),
    ({"process": {"args": ["/bin/true"], "cwd": "srv"}}, r"config.json: process.cwd: 'srv' is not an absolute path"),
    ({"process": {"args": ["/bin/true"], "env": ["NOEQUALS"]}}, r"config.json: process.env\[0\]: 'NOEQUALS' is not NAME=VALUE"),
    ({"process": {"args": ["/bin/true"], "user": {"uid": "root"}}}, r"config.json: process.user.uid: \"root\" is not an integer"),
    ({"process": {"args": ["/bin/true"], "capabilities": {"bounding": ["CAP_FLY"]}}},
     r"config.json: process.capabilities.bounding\[0\]: 'CAP_FLY' is not a Linux capability"),
    ({"process": {"args": ["/bin/true"], "rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]}},
     r"config.json: process.rlimits\[0\].type: 'RLIMIT_BOGUS' is not a Linux resource limit"),
    ({"linux": {"namespaces": [{"type": "network"}, {"type": "bogus"}]}},
     r"config.json: linux.namespaces\[1\].type: 'bogus' is not a Linux namespace type"),
    ({"linux": {"namespaces": [{"type": "pid"}]}}, r"config.json: linux.namespaces: no network namespace: .*host's network"),
    ({"mounts": [{"destination": "/x", "type": "nfs", "source": "server:/x"}]},
     r"config.json: mounts\[0\].type: 'nfs' mounts are not supported"),
    ({"mounts": [{"destination": "/x", "type": "bind", "source": "/nonexistent/dir"}]},
     r"config.json: mounts\[0\].source: /nonexistent/dir: No such file or directory"),
    ({"mounts": [{"destination": "x/../y", "type": "tmpfs"}]}, r"config.json: mounts\[0\].destination: 'x/../y' is not a clean absolute path"),
    ({"linux": {"namespaces": [{"type": "network"}], "seccomp": {"defaultAction": "SCMP_ACT_NOTIFY"}}},
     r"config.json: linux.seccomp.defaultAction: 'SCMP_ACT_NOTIFY' is not a seccomp action kvmpod applies"),
])
def test_bad_configs_are_named_in_one_line(bundle_dir, change, message):
    (bundle_dir / "file").write_text("")
    config = _config()
    config.update(change)
    if config.get("ociVersion") is None:
        config["ociVersion"] = None
    with pytest.raises(b.BundleError, match=message) as info:
        b.read_bundle(_write(bundle_dir, config))
    assert "\n" not in str(info.value)


def test_a_missing_or_malformed_config_json(tmp_path):
    with pytest.raises(b.BundleError, match=r"config.json: no such file \(is .* an OCI bundle\?\)"):
        b.read_bundle(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(b.BundleError, match=r"config.json: not valid JSON"):
        b.read_bundle(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(b.BundleError, match=r"config.json: not a JSON object"):
        b.read_bundle(tmp_path)


def test_signals_by_number_and_name():
    assert parse_signal("9") == parse_signal("KILL") == parse_signal("SIGKILL") == parse_signal("sigkill") == 9
    assert parse_signal("USR1") == 10
    for bad in ("0", "65", "SIGFLY", "-1"):
        with pytest.raises(Exception, match="is not a signal"):
            parse_signal(bad)


def _oci(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmpod.oci_runtime", "--root", str(tmp_path / "root"), *args],
                          capture_output=True, text=True, timeout=60)


def test_create_of_a_bad_bundle_starts_nothing_and_leaves_nothing(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    config = _config()
    config["linux"]["namespaces"] = [{"type": "pid"}, {"type": "uts"}]
    (bundle / "config.json").write_text(json.dumps(config))
    done = _oci(tmp_path, "create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), "c1")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "kvmpod-oci: error: config.json: linux.namespaces: no network namespace: the container would share the "
        "host's network stack, which a VM cannot (podman: use --network none or a network)"]
    assert not (tmp_path / "pid").exists() and not (tmp_path / "root" / "c1").exists()


def test_unknown_commands_and_flags_are_named(tmp_path):
    done = _oci(tmp_path, "checkpoint", "c1")
    assert done.returncode != 0 and "invalid choice: 'checkpoint'" in done.stderr
    done = _oci(tmp_path, "create", "--bogus", "c1")
    assert done.returncode != 0 and "unrecognized arguments: --bogus" in done.stderr
    done = _oci(tmp_path, "create", "--preserve-fds", "3", "c1")
    assert done.returncode != 0 and "extra file descriptors into a VM is not supported" in done.stderr


def test_commands_on_a_container_that_does_not_exist(tmp_path):
    for args in (["state", "nope"], ["start", "nope"], ["kill", "nope", "KILL"], ["delete", "nope"]):
        done = _oci(tmp_path, *args)
        assert done.returncode == 1 and done.stderr.strip() == "kvmpod-oci: error: container nope does not exist"
    assert _oci(tmp_path, "delete", "--force", "nope").returncode == 0   # runc: nothing to delete is fine


def test_json_log_format_for_containerd(tmp_path):
    log = tmp_path / "log.json"
    done = _oci(tmp_path, "--log", str(log), "--log-format=json", "state", "nope")
    assert done.returncode == 1
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and entry["msg"] == "container nope does not exist" and entry["time"]


def test_features_and_list(tmp_path):
    features = json.loads(_oci(tmp_path, "features").stdout)
    assert features["ociVersionMax"] == "1.0.2" and "network" in features["linux"]["namespaces"]
    assert json.loads(_oci(tmp_path, "list", "--format", "json").stdout) == []


def test_records_refuse_a_second_create_of_an_id(tmp_path):
    records = Records(tmp_path)
    records.new("c1", {"id": "c1"})
    with pytest.raises(Exception, match="container c1 exists already"):
        records.new("c1", {"id": "c1"})
    assert records.get("c1").status == "creating"
