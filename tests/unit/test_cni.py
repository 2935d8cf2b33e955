"""CNI networks (kvmpod/net/cni.py): config lookup and checks, plugin calls (with a fake plugin written
here), result conversion, release; and, as root with the Debian plugins, attach/release in a
network namespace the test makes (no VM)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kvmpod.errors import ConfigError, NetworkError
from kvmpod.net import cni
from kvmpod.net.spec import DnsConfig, GuestInterface, Route

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PLUGINS = Path("/usr/lib/cni")

FAKE_PLUGIN = f"""#!{sys.executable}
import json, os, sys, time
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
with open(conf["log"], "a") as f:
    f.write(json.dumps({{"type": conf["type"], "env": dict(os.environ), "conf": conf}}) + "\\n")
if conf.get("sleep") == cmd:
    if os.fork() == 0:   # a child (like an IPAM plugin) that must die with the plugin
        with open(conf["log"] + ".child", "w") as f:
            f.write(str(os.getpid()))
    time.sleep(30)
if conf.get("fail") == cmd:
    if conf.get("plain"):
        sys.stderr.write("something broke\\nbadly\\n")
        sys.exit(3)
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 11, "msg": "no luck",
                      "details": "plugin said so"}}))
    sys.exit(1)
if cmd == "ADD":
    result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "interfaces": [], "ips": []}}
    result = dict(result, **conf.get("add", {{}}))
    result.setdefault("seen", []).append(conf["type"])
    print(json.dumps(result))
"""


@pytest.fixture
def plugins(tmp_path) -> Path:
    """A plugin dir with fake plugins `fake`, `fake2` and `ipamfake` (one script)."""
    directory = tmp_path / "plugins"
    directory.mkdir()
    for name in ("fake", "fake2", "ipamfake"):
        (directory / name).write_text(FAKE_PLUGIN)
        (directory / name).chmod(0o755)
    return directory


@pytest.fixture
def log(tmp_path) -> Path:
    return tmp_path / "calls.log"


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def conflist(name: str, *plugins: dict, version: str = "1.0.0") -> dict:
    return {"cniVersion": version, "name": name, "plugins": list(plugins)}


# --- config lookup ---------------------------------------------------------------------------------


def test_finds_network_by_name_conflist_before_conf(tmp_path):
    d = tmp_path / "net.d"
    write(d / "00-a.conf", {"cniVersion": "0.4.0", "name": "net1", "type": "bridge"})
    write(d / "20-b.conflist", conflist("net1", {"type": "ptp"}))
    write(d / "10-c.conflist", conflist("net2", {"type": "macvlan"}))
    write(d / "05-d.json", {"cniVersion": "0.3.1", "name": "net3", "type": "ipvlan"})
    write(d / "README", "not a config")
    assert cni.load_network("net1", [d]).plugins == ({"type": "ptp"},)
    assert cni.load_network("net2", [d]).source == d / "10-c.conflist"
    single = cni.load_network("net3", [d])
    assert single.cni_version == "0.3.1" and single.plugins[0]["type"] == "ipvlan"


def test_first_dir_wins(tmp_path):
    write(tmp_path / "a" / "x.conflist", conflist("n", {"type": "ptp"}))
    write(tmp_path / "b" / "x.conflist", conflist("n", {"type": "bridge"}))
    assert cni.load_network("n", [tmp_path / "b", tmp_path / "a"]).plugins[0]["type"] == "bridge"


def test_missing_network_names_dirs_and_known_networks(tmp_path):
    write(tmp_path / "d" / "1.conflist", conflist("other", {"type": "ptp"}))
    with pytest.raises(NetworkError) as e:
        cni.load_network("nope", [tmp_path / "d", tmp_path / "missing"])
    assert str(e.value) == (f"--net nope: no CNI network named 'nope' in {tmp_path / 'd'}, {tmp_path / 'missing'} "
                            "(networks there: other)")


@pytest.mark.parametrize("content, message", [
    ("{oops", "invalid JSON: Expecting property name"),
    ("[]", "not a JSON object"),
    ({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}, "name: None is not a network name"),
    ({"cniVersion": "1.0.0", "name": "bad name", "plugins": [{"type": "x"}]}, "name: 'bad name' is not"),
    ({"name": "n", "plugins": [{"type": "x"}]}, "cniVersion: None is not a CNI version"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "plugins: must be a non-empty list"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "ok"}, {"type": "../evil"}]},
     "plugins[1].type: '../evil' is not a plugin name"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "ok", "ipam": {"subnet": "x"}}]},
     "plugins[0].ipam.type: None is not a plugin name"),
])
def test_bad_conflist_names_file_and_field(tmp_path, content, message):
    path = write(tmp_path / "d" / "10-bad.conflist", content)
    with pytest.raises(NetworkError) as e:
        cni.load_network("n", [tmp_path / "d"])
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_single_conf_field(tmp_path):
    path = write(tmp_path / "d" / "1.conf", {"cniVersion": "1.0.0", "name": "n"})
    with pytest.raises(NetworkError, match=f"^{path}: type: None is not a plugin name$"):
        cni.load_network("n", [tmp_path / "d"])


def test_missing_plugin_binary_names_file_and_field(tmp_path, plugins):
    path = write(tmp_path / "d" / "1.conflist",
                 conflist("n", {"type": "fake"}, {"type": "fake2", "ipam": {"type": "nosuch"}}))
    conf = cni.load_network("n", [tmp_path / "d"])
    with pytest.raises(NetworkError) as e:
        cni.check_plugins(conf, [plugins, tmp_path / "elsewhere"])
    assert str(e.value) == (f"network n ({path}): plugins[1].ipam.type: no executable CNI plugin 'nosuch' in "
                            f"{plugins}, {tmp_path / 'elsewhere'} ([net] cni-plugin-path in kvmpod.toml)")


def test_config_dirs_and_plugin_path_from_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    toml = write(tmp_path / "conf" / "kvmpod.toml",
                 '[net]\ncni-config-dirs = ["net.d", "/abs/dir"]\ncni-plugin-path = "/plugins"\n'
                 "cni-plugin-timeout = 7\n")
    monkeypatch.setenv("KVMPOD_CONFIG", str(toml))
    assert cni.config_dirs() == [tmp_path / "conf" / "net.d", Path("/abs/dir")]
    assert cni.plugin_path() == [Path("/plugins")]
    assert cni.plugin_timeout() == 7
    write(toml, "[net]\ncni-config-dirs = [1]\n")
    with pytest.raises(ConfigError, match=r"\[net\] cni-config-dirs in .*kvmpod.toml: \[1\] is not a list"):
        cni.config_dirs()


def test_defaults_without_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("KVMPOD_CONFIG", raising=False)
    monkeypatch.setattr("kvmpod.paths.config_files", lambda: [tmp_path / "none.toml"])
    assert cni.config_dirs() == [Path("/etc/kvmpod/net.d")]
    assert cni.plugin_path() == [Path("/usr/lib/cni"), Path("/opt/cni/bin")]
    assert cni.plugin_timeout() == 60


# --- plugin calls ----------------------------------------------------------------------------------


def call(plugins: Path, netns: str = "/run/netns/kvmpod-x", timeout: float = 10) -> cni.Invocation:
    return cni.Invocation("pod-uuid-1", netns, (plugins,), timeout)


def test_add_chains_prev_result_with_cni_environment_only(tmp_path, plugins, log, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "must-not-leak")
    conf = cni.NetworkConfig("n", "1.0.0", ({"type": "fake", "log": str(log), "add": {"ips": [
        {"address": "10.1.0.5/24", "gateway": "10.1.0.1"}]}}, {"type": "fake2", "log": str(log), "name": "x",
                                                                "cniVersion": "0.1.0"}), tmp_path / "n.conflist")
    result = cni.add_network(conf, "eth1", call(plugins))
    assert result["seen"] == ["fake", "fake2"] and result["ips"][0]["address"] == "10.1.0.5/24"
    first, second = calls(log)
    assert "prevResult" not in first["conf"]
    assert second["conf"]["prevResult"]["seen"] == ["fake"]
    assert second["conf"]["name"] == "n" and second["conf"]["cniVersion"] == "1.0.0"   # the list's, not the plugin's
    env = first["env"]
    env.pop("LC_CTYPE", None)   # Python's own locale coercion may add it
    assert env == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "pod-uuid-1", "CNI_NETNS": "/run/netns/kvmpod-x",
                   "CNI_IFNAME": "eth1", "CNI_PATH": str(plugins), "PATH": os.environ["PATH"]}


@pytest.mark.parametrize("version, prev", [("1.0.0", True), ("0.4.0", True), ("0.3.1", False)])
def test_del_reverse_order_and_prev_result_by_version(tmp_path, plugins, log, version, prev):
    conf = cni.NetworkConfig("n", version, ({"type": "fake", "log": str(log)}, {"type": "fake2", "log": str(log)}),
                             tmp_path / "n.conflist")
    cni.del_network(conf, "eth0", call(plugins), {"cniVersion": version, "ips": []})
    order = calls(log)
    assert [c["type"] for c in order] == ["fake2", "fake"]
    assert all(c["env"]["CNI_COMMAND"] == "DEL" for c in order)
    assert all(("prevResult" in c["conf"]) == prev for c in order)


def test_del_tries_every_plugin_then_raises(tmp_path, plugins, log):
    conf = cni.NetworkConfig("n", "1.0.0", ({"type": "fake", "log": str(log)},
                                            {"type": "fake2", "log": str(log), "fail": "DEL"}), tmp_path / "n.conflist")
    with pytest.raises(NetworkError, match="^network n: CNI plugin fake2 DEL failed: no luck: plugin said so "
                                           r"\(CNI error code 11\)$"):
        cni.del_network(conf, "eth0", call(plugins), None)
    assert [c["type"] for c in calls(log)] == ["fake2", "fake"]


def test_plugin_error_without_json_reports_stderr_on_one_line(tmp_path, plugins, log):
    conf = cni.NetworkConfig("n", "1.0.0", ({"type": "fake", "log": str(log), "fail": "ADD", "plain": True},),
                             tmp_path / "n.conflist")
    with pytest.raises(NetworkError) as e:
        cni.add_network(conf, "eth0", call(plugins))
    assert str(e.value) == "network n: CNI plugin fake ADD failed: exit status 3: something broke badly"


def test_plugin_result_not_json(tmp_path, plugins):
    (plugins / "fake").write_text("#!/bin/sh\ncat >/dev/null\necho hello\n")
    conf = cni.NetworkConfig("n", "1.0.0", ({"type": "fake"},), tmp_path / "n.conflist")
    with pytest.raises(NetworkError, match="^network n: CNI plugin fake ADD failed: its result is not JSON .*: hello$"):
        cni.add_network(conf, "eth0", call(plugins))


def test_plugin_timeout_kills_its_process_group(tmp_path, plugins, log):
    conf = cni.NetworkConfig("n", "1.0.0", ({"type": "fake", "log": str(log), "sleep": "ADD"},),
                             tmp_path / "n.conflist")
    started = time.monotonic()
    with pytest.raises(NetworkError, match=r"^network n: CNI plugin fake ADD failed: no answer within 1 s"):
        cni.add_network(conf, "eth0", call(plugins, timeout=1))
    assert time.monotonic() - started < 10
    child = int(Path(str(log) + ".child").read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


# --- results ---------------------------------------------------------------------------------------


BRIDGE_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "kvcni0", "mac": "aa:aa:aa:aa:aa:aa"},
                   {"name": "veth1234", "mac": "bb:bb:bb:bb:bb:bb"},
                   {"name": "eth0", "mac": "02:42:ac:11:00:02", "sandbox": "/run/netns/kvmpod-x"}],
    "ips": [{"interface": 2, "address": "10.77.0.5/24", "gateway": "10.77.0.1"},
            {"interface": 0, "address": "10.77.0.1/24"},
            {"interface": 2, "address": "fd00::5/64", "gateway": "fd00::1"}],
    "routes": [{"dst": "10.80.0.0/16"}, {"dst": "192.168.9.0/24", "gw": "10.77.0.254"}],
    "dns": {"nameservers": ["10.77.0.1"], "domain": "pod.test", "options": ["ndots:2"]},
}


def test_interface_from_result():
    iface = cni.interface_from_result("n", BRIDGE_RESULT, "eth0", "02:42:ac:11:00:02", 1450)
    assert iface == GuestInterface("02:42:ac:11:00:02", "eth0", 1450, ("10.77.0.5/24", "fd00::5/64"),
                                   (Route("10.80.0.0/16", "10.77.0.1"), Route("192.168.9.0/24", "10.77.0.254")))
    assert cni.gateways_of(BRIDGE_RESULT, "eth0") == ["10.77.0.1", "fd00::1"]
    assert cni.dns_from_result("n", BRIDGE_RESULT) == DnsConfig(("10.77.0.1",), ("pod.test",), ("ndots:2",))


def test_result_without_interfaces_uses_every_ip():
    result = {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.9.0.2/16", "gateway": "10.9.0.1"}],
              "routes": [{"dst": "0.0.0.0/0"}]}
    iface = cni.interface_from_result("n", result, "eth1", "02:00:00:00:00:01", 1500)
    assert iface.addresses == ("10.9.0.2/16",) and iface.routes == (Route("0.0.0.0/0", "10.9.0.1"),)
    assert cni.dns_from_result("n", result) is None


def test_legacy_result_is_converted():
    result = {"cniVersion": "0.2.0", "ip4": {"ip": "10.3.0.7/24", "gateway": "10.3.0.1",
                                            "routes": [{"dst": "0.0.0.0/0"}]},
              "dns": {"nameservers": ["1.1.1.1"]}}
    iface = cni.interface_from_result("n", result, "eth0", "02:00:00:00:00:01", 1500)
    assert iface.addresses == ("10.3.0.7/24",) and iface.routes == (Route("0.0.0.0/0", "10.3.0.1"),)
    assert cni.dns_from_result("n", result) == DnsConfig(("1.1.1.1",))


@pytest.mark.parametrize("result, message", [
    ({"ips": [{"address": "banana"}]}, "has ips[0] with a bad address"),
    ({"ips": [{"address": "10.0.0.1/24", "interface": 4}]}, "has ips[0].interface 4 that names no interface"),
    ({"routes": [{"dst": "nowhere"}]}, "has routes[0] with a bad dst"),
])
def test_bad_results(result, message):
    with pytest.raises(NetworkError, match=f"^network n: the CNI result {re.escape(message)}"):
        cni.interface_from_result("n", {"cniVersion": "1.0.0", **result}, "eth0", "02:00:00:00:00:01", 1500)


def test_bad_dns_is_refused():
    with pytest.raises(NetworkError, match="dns search domain that is not one word"):
        cni.dns_from_result("n", {"dns": {"search": ["a\nnameserver 6.6.6.6"]}})
    with pytest.raises(NetworkError, match="dns nameserver that is not an address"):
        cni.dns_from_result("n", {"dns": {"nameservers": ["evil"]}})


def test_default_route_from_first_gateway_only_where_no_routes():
    a = GuestInterface("02:00:00:00:00:01", "eth0", addresses=("10.1.0.2/24",))
    b = GuestInterface("02:00:00:00:00:02", "eth1", addresses=("10.2.0.2/24", "fd01::2/64"))
    out = cni.add_default_routes([a, b], [["10.1.0.1"], ["10.2.0.1", "fd01::1"]])
    assert out[0].routes == (Route("0.0.0.0/0", "10.1.0.1"),)
    assert out[1].routes == (Route("::/0", "fd01::1"),)
    routed = GuestInterface("02:00:00:00:00:02", "eth1", routes=(Route("10.50.0.0/16", "10.2.0.1"),))
    out = cni.add_default_routes([a, routed], [["10.1.0.1"], ["10.2.0.1"]])
    assert out[0].routes == () and out[1].routes == routed.routes   # explicit routes stay exactly those


# --- release ---------------------------------------------------------------------------------------


def record_for(tmp_path, plugins, log, *networks: dict, netns: str | None = None) -> dict:
    return {"kind": "cni", "container_id": "pod-uuid-2",
            "netns": netns or str(cni.NETNS_DIR / f"kvmpod-{uuid.uuid4()}"),
            "plugin_path": [str(plugins)], "timeout": 10,
            "networks": [{"name": n["name"], "cniVersion": "1.0.0", "source": str(tmp_path / "x.conflist"),
                          "ifname": f"eth{i}", "state": "added", "result": {"cniVersion": "1.0.0", "ips": []},
                          "plugins": [{"type": "fake", "log": str(log), **n.get("extra", {})}]}
                         for i, n in enumerate(networks)]}


def test_release_without_namespace_dels_with_empty_netns_and_is_idempotent(tmp_path, plugins, log):
    record = record_for(tmp_path, plugins, log, {"name": "a"}, {"name": "b"})
    cni.release(record)
    cni.release(record)
    seen = calls(log)
    assert [(c["conf"]["name"], c["env"]["CNI_IFNAME"], c["env"]["CNI_NETNS"]) for c in seen] == \
        [("b", "eth1", ""), ("a", "eth0", "")] * 2
    assert all("prevResult" in c["conf"] for c in seen)


def test_release_reports_a_failed_del_after_trying_the_rest(tmp_path, plugins, log):
    record = record_for(tmp_path, plugins, log, {"name": "a"}, {"name": "b", "extra": {"fail": "DEL"}})
    with pytest.raises(NetworkError, match=r"^network b: CNI plugin fake DEL failed: no luck"):
        cni.release(record)
    assert [c["conf"]["name"] for c in calls(log)] == ["b", "a"]


def test_release_of_half_made_record(tmp_path, plugins, log):
    cni.release({"kind": "cni", "container_id": "x", "netns": str(cni.NETNS_DIR / "kvmpod-never-made"),
                 "plugin_path": [str(plugins)], "networks": []})
    cni.release({"kind": "cni", "netns": None, "networks": []})
    record = record_for(tmp_path, plugins, log, {"name": "a"})
    record["networks"][0].update(state="adding", result=None)
    cni.release(record)
    assert "prevResult" not in calls(log)[0]["conf"]


def test_release_refuses_a_foreign_namespace_path(tmp_path, plugins, log):
    for bad in ("/run/netns/other", "/etc/passwd", str(cni.NETNS_DIR / "kvmpod-x/../../etc")):
        with pytest.raises(NetworkError, match="not a kvmpod network namespace: not touched"):
            cni.release(record_for(tmp_path, plugins, log, netns=bad))


def test_remember_saves_the_same_record_in_place(tmp_path, monkeypatch):
    """attach.py's remember(): cni.py calls it again with its updated record."""
    from kvmpod.net import attach
    from kvmpod.net.spec import NetRequest

    seen = []

    def fake_attach(names, pod_uuid, pod_path, remember, forwards=None, config_dirs=None):
        record = {"kind": "test", "step": 1}
        remember(record)
        record["step"] = 2
        remember(record)
        seen.append(json.loads((pod_path / "net.json").read_text()))
        raise NetworkError("stop here")

    monkeypatch.setattr(cni, "attach", fake_attach)
    with pytest.raises(NetworkError):
        attach.setup(NetRequest("cni", ("n",)), str(uuid.uuid4()), tmp_path, [], lambda s: None)
    assert seen == [[{"kind": "test", "step": 2}]]


# --- as root, with the Debian plugins, in a namespace of the test's own (no VM) ----------------------


needs_root_and_plugins = pytest.mark.skipif(
    os.geteuid() != 0 or not all((DEBIAN_PLUGINS / p).exists() for p in ("bridge", "host-local")),
    reason="needs root and the CNI bridge and host-local plugins in /usr/lib/cni "
           "(Debian package containernetworking-plugins)")

SCRIPT = """
import json, os, sys
from pathlib import Path
from kvmpod.net import cni
records = []
def remember(r):
    if not any(x is r for x in records):
        records.append(r)
    Path(sys.argv[3], "record.json").write_text(json.dumps(records))
try:
    found = cni.attach(sys.argv[1].split(","), sys.argv[2], Path(sys.argv[3]), remember)
except Exception as e:
    print(json.dumps({"error": str(e), "records": records}))
    sys.exit(0)
out = {"attachments": [{"network": a.network, "mac": a.interface.mac, "mtu": a.interface.mtu,
                        "addresses": a.interface.addresses,
                        "routes": [[r.destination, r.gateway] for r in a.interface.routes],
                        "dns": a.dns and a.dns.nameservers, "fd": a.tap_fd} for a in found],
       "records": records}
import subprocess
ns = "kvmpod-" + sys.argv[2]
out["links"] = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout
out["filters"] = {d: subprocess.run(["tc", "-n", ns, "filter", "show", "dev", d, "ingress"], capture_output=True,
                                    text=True).stdout for d in ("eth0", "tap0")}
for a in found:
    os.close(a.tap_fd)
cni.release(json.loads(json.dumps(records[0])))
out["after"] = os.path.exists("/run/netns/" + ns)
print(json.dumps(out))
"""


@pytest.fixture
def test_netns():
    name = f"kvcnit-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


def bridge_conflist(tmp_path: Path, name: str, subnet: str, bridge: str) -> dict:
    return conflist(name, {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                           "ipam": {"type": "host-local", "subnet": subnet, "dataDir": str(tmp_path / "ipam")},
                           "dns": {"nameservers": ["10.77.0.1"]}})


def run_in(netns: str, tmp_path: Path, names: str) -> dict:
    toml = write(tmp_path / "kvmpod.toml", f'[net]\ncni-config-dirs = ["{tmp_path / "net.d"}"]\n'
                                           f'cni-plugin-path = ["{tmp_path / "plugins"}", "/usr/lib/cni"]\n')
    pod = tmp_path / "pod"
    pod.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "KVMPOD_CONFIG": str(toml), "PYTHONPATH": str(REPO),
           "HOME": str(tmp_path)}
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT, names, str(uuid.uuid4()),
                          str(pod)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@needs_root_and_plugins
def test_attach_and_release_with_the_real_plugins(tmp_path, test_netns, plugins):
    write(tmp_path / "net.d" / "10-t.conflist", bridge_conflist(tmp_path, "t", "10.77.0.0/24", "kvcni0"))
    write(tmp_path / "net.d" / "20-u.conflist", bridge_conflist(tmp_path, "u", "10.78.0.0/24", "kvcni1"))
    out = run_in(test_netns, tmp_path, "t,u")
    assert "error" not in out, out
    t, u = out["attachments"]
    assert t["addresses"] == ["10.77.0.2/24"] and u["addresses"] == ["10.78.0.2/24"]
    assert t["routes"] == [["0.0.0.0/0", "10.77.0.1"]] and u["routes"] == []
    assert t["dns"] == ["10.77.0.1"] and t["mtu"] == 1500
    assert "eth0@" in out["links"] and "tap0:" in out["links"] and "tap1:" in out["links"]
    assert t["mac"] in out["links"]
    assert "Egress Redirect to device tap0" in out["filters"]["eth0"]
    assert "Egress Redirect to device eth0" in out["filters"]["tap0"]
    assert out["after"] is False                                       # the namespace is gone
    assert sorted(p.name for p in (tmp_path / "ipam" / "t").iterdir()) == ["last_reserved_ip.0", "lock"]  # DEL ran
    assert sorted(p.name for p in (tmp_path / "ipam" / "u").iterdir()) == ["last_reserved_ip.0", "lock"]
    assert json.loads((tmp_path / "pod" / "cni-t.json").read_text())["ips"][0]["address"] == "10.77.0.2/24"
    links = subprocess.run(["ip", "-n", test_netns, "-o", "link"], capture_output=True, text=True).stdout
    assert "veth" not in links and "kvcni0" in links


@needs_root_and_plugins
def test_failure_halfway_undoes_everything(tmp_path, test_netns, plugins, log):
    write(tmp_path / "net.d" / "10-t.conflist", bridge_conflist(tmp_path, "t", "10.77.0.0/24", "kvcni0"))
    write(tmp_path / "net.d" / "20-bad.conflist",
          conflist("bad", {"type": "fake", "log": str(log), "fail": "ADD"}))
    out = run_in(test_netns, tmp_path, "t,bad")
    assert out["error"] == "network bad: CNI plugin fake ADD failed: no luck: plugin said so (CNI error code 11)"
    record = out["records"][0]
    assert record["networks"] == [] and record["netns"] is None        # undone, nothing left for gc
    assert [c["env"]["CNI_COMMAND"] for c in calls(log)] == ["ADD", "DEL"]   # the failed ADD is DELeted too
    assert sorted(p.name for p in (tmp_path / "ipam" / "t").iterdir()) == ["last_reserved_ip.0", "lock"]
    assert not any(p.name.startswith("kvmpod-") and p.name.endswith(record["container_id"])
                   for p in cni.NETNS_DIR.iterdir())
    links = subprocess.run(["ip", "-n", test_netns, "-o", "link"], capture_output=True, text=True).stdout
    assert "veth" not in links


def test_release_with_a_plugin_gone_since_add_names_it(tmp_path, plugins, log):
    record = record_for(tmp_path, plugins, log, {"name": "a"}, {"name": "b"})
    record["networks"][1]["plugins"][0]["type"] = "vanished"
    with pytest.raises(NetworkError, match=r"^network b: CNI plugin vanished DEL failed: no executable CNI plugin "):
        cni.release(record)
    assert [c["conf"]["name"] for c in calls(log)] == ["a"]


def test_port_mappings_reach_only_the_plugins_that_declare_the_capability():
    from kvmpod.net.spec import PortForward

    conf = cni.NetworkConfig("n", "1.0.0", ({"type": "bridge"}, {"type": "portmap",
                                                                 "capabilities": {"portMappings": True}}),
                             Path("/x.conflist"))
    mappings = cni.port_mappings([PortForward("http", "tcp", "", 8080, 80, 2),
                                  PortForward("dns", "udp", "127.0.0.1", 53, 5353)])
    assert mappings == [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                        {"hostPort": 8081, "containerPort": 81, "protocol": "tcp"},
                        {"hostPort": 53, "containerPort": 5353, "protocol": "udp", "hostIP": "127.0.0.1"}]
    conf = dataclasses.replace(conf, runtime={"portMappings": mappings})
    assert "runtimeConfig" not in json.loads(conf.stdin(0, None))
    assert json.loads(conf.stdin(1, None))["runtimeConfig"] == {"portMappings": mappings}
    again = cni.NetworkConfig.from_record(json.loads(json.dumps(conf.to_record())))
    assert json.loads(again.stdin(1, None))["runtimeConfig"] == {"portMappings": mappings}   # DEL gets them too
