"""kvmpod as rkt's stage1, end to end: tests/stage0.py renders pod directories as rkt's stage0 does
(from kvmpod's busybox ACI), takes the lock and runs the stage1 ACI's entrypoints with rkt's argv;
every pod boots a real VM. docs/stage1.md."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from kvmpod.stage1 import build
from tests.e2e.conftest import qemu_pids_of
from tests.stage0 import App, Pod, Stage0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="apps run from their rendered rootfs over virtio-fs: "
                                                          "virtiofsd needs root")
REPO = Path(__file__).resolve().parents[2]
SLEEPER = {"exec": "/bin/sleep", "args": ["600"]}


def _built_for_this_python(aci: Path) -> bool:
    try:
        with tarfile.open(aci) as tar:
            manifest = json.load(tar.extractfile("manifest"))
    except (OSError, tarfile.TarError, ValueError, KeyError):
        return False
    return {"name": "kvmpod/stage1-python", "value": sys.executable} in manifest.get("annotations", [])


@pytest.fixture(scope="session")
def stage1_aci(tmp_path_factory) -> Path:
    """`make stage1`'s ACI when it runs this interpreter (make test builds it first), else one built now."""
    made = REPO / "build" / "kvmpod-stage1.aci"
    if _built_for_this_python(made):
        return made
    out = tmp_path_factory.mktemp("stage1") / "kvmpod-stage1.aci"
    out.write_bytes(build.build_aci(sys.executable))
    return out


class Rkt(Stage0):
    """tests/stage0.py with the test session's kvmpod directories in the entrypoints' environment."""

    def __init__(self, data_dir: Path, stage1_aci: Path, env: dict[str, str]):
        super().__init__(data_dir, stage1_aci)
        self.env = env

    def pod(self, *apps: App, **prepare) -> Pod:
        pod = self.prepare(list(apps), **prepare)
        self.prepared.append(pod)
        return pod

    def go(self, pod: Pod, net: str = "none", **kw) -> subprocess.CompletedProcess:
        timeout = kw.pop("timeout", 240)
        input_ = kw.pop("input", None)
        argv = self.run_argv(pod, net=net, **kw)
        return self.run(pod, argv, env=self.env, timeout=timeout, input=input_)

    def start(self, pod: Pod, net: str = "none", wrap: tuple[str, ...] = ()) -> subprocess.Popen:
        proc = self.spawn_run(pod, [*wrap, *self.run_argv(pod, net=net)], env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.started.append(proc)
        return proc


@pytest.fixture
def rkt(stage1_aci, tmp_path, kvmpod_env):
    r = Rkt(tmp_path / "rkt", stage1_aci, kvmpod_env)
    r.prepared, r.started = [], []
    yield r
    for proc in r.started:  # a failed test still ends its pods (nothing_left_behind checks the rest)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for pod in r.prepared:
        if pod.lock_fd is not None:
            os.close(pod.lock_fd)
        if not Stage0.running(pod):
            r.gc(pod, env=kvmpod_env)


def sh(script: str, **kw) -> dict:
    return {"exec": "/bin/sh", "args": ["-c", script], **kw}


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.decode().splitlines() if not line.startswith("kvmpod: notice:")]


# -- exit statuses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("script, code", [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 137)])
def test_one_app_exit_status_in_the_status_file_and_as_runs(rkt, busybox_aci, script, code):
    pod = rkt.pod(App(busybox_aci, **sh(script)))
    result = rkt.go(pod)
    assert result.returncode == code, result.stderr.decode()
    assert rkt.statuses(pod) == {"busybox": code}
    assert not rkt.running(pod) and pod.file("pid").is_file()


@pytest.mark.parametrize("first, second, code, statuses", [
    (sh("exit 0"), sh("sleep 1; exit 3"), 3, {"one": 0, "two": 3}),
    # rkt's rule: the first app to fail stops the pod, and its status is the pod's whatever the order
    (SLEEPER, sh("exit 3"), 3, {"one": 143, "two": 3}),
    (sh("exit 0"), sh("kill -9 $$"), 137, {"one": 0, "two": 137}),
])
def test_two_app_pods(rkt, busybox_aci, first, second, code, statuses):
    pod = rkt.pod(App(busybox_aci, name="one", **first), App(busybox_aci, name="two", **second))
    result = rkt.go(pod)
    assert result.returncode == code, result.stderr.decode()
    assert rkt.statuses(pod) == statuses


def test_output_and_environment(rkt, busybox_aci):
    script = ('echo "out $PATH $AC_APP_NAME"; echo err >&2; hostname; echo "$AC_METADATA_URL"; '
              'wget -q -O - "$AC_METADATA_URL/acMetadata/v1/pod/uuid"; echo; grep CapBnd /proc/self/status')
    pod = rkt.pod(App(busybox_aci, **sh(script)))
    manifest = json.loads(pod.file("pod").read_text())   # isolators, as `rkt run --caps-retain` writes them
    manifest["apps"][0]["app"]["isolators"] = [
        {"name": "os/linux/capabilities-retain-set", "value": {"set": ["CAP_KILL", "CAP_NET_BIND_SERVICE"]}},
        {"name": "os/linux/oom-score-adj", "value": 100}]
    pod.file("pod").write_text(json.dumps(manifest))
    # the argv in Go flag's other spellings: space-separated values, an explicit false
    argv = [rkt.run_argv(pod)[0], "--debug=false", "--net", "none", "--hostname", "web", "--mds-token", "tok", pod.uuid]
    result = rkt.run(pod, argv, env=rkt.env)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode().splitlines()
    assert out[0] == "out /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin busybox"
    assert out[1] == "web" and out[2].startswith("http://127.0.0.1:18112/")
    assert out[3] == pod.uuid   # the UUID stage0 chose is the pod's
    assert out[4].split() == ["CapBnd:", "0000000000000420"]   # KILL (5) and NET_BIND_SERVICE (10)
    assert errors(result) == ["err"]
    assert "kvmpod: notice: app busybox: isolator os/linux/oom-score-adj is not enforced" in result.stderr.decode()
    assert rkt.statuses(pod) == {"busybox": 0}


def test_default_hostname_and_writes_land_in_the_rendered_rootfs(rkt, busybox_aci):
    pod = rkt.pod(App(busybox_aci, **sh("hostname; echo kept > /written")))
    result = rkt.go(pod)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == f"rkt-{pod.uuid}\n".encode()
    assert pod.file("stage1/rootfs/opt/stage2/busybox/rootfs/written").read_text() == "kept\n"


def test_overlay_rendered_app_rootfs(rkt, busybox_aci):
    """rkt's default rendering: the app's rootfs an overlay on the tree store's copy of the image."""
    pod = rkt.pod(App(busybox_aci, **sh("cat /etc/greeting; echo kept > /written")), overlay=True)
    result = rkt.go(pod)
    assert (result.returncode, result.stdout) == (0, b"Hello from a kvmpod VM!\n"), result.stderr.decode()
    tree_id = pod.file("appsinfo/busybox/treeStoreID").read_text()
    assert pod.file("overlay", tree_id, "upper/busybox/written").read_text() == "kept\n"
    assert not (rkt.data_dir / "cas/tree" / tree_id / "rootfs/written").exists()   # the image stays as it was


def test_interactive_with_pipes(rkt, busybox_aci):
    pod = rkt.pod(App(busybox_aci, **sh("cat; tty; exit 4")))
    result = rkt.go(pod, interactive=True, input=b"from stdin\n")
    assert (result.returncode, result.stdout) == (4, b"from stdin\nnot a tty\n"), result.stderr.decode()


def test_interactive_on_a_terminal(rkt, busybox_aci):
    import fcntl
    import pty
    import termios

    pod = rkt.pod(App(busybox_aci, **sh("tty; read line; echo got $line; exit 6")))
    master, slave = pty.openpty()
    try:
        proc = rkt.spawn_run(pod, rkt.run_argv(pod, net="none", interactive=True), env=rkt.env, stdin=slave,
                             stdout=slave, stderr=slave, start_new_session=True,
                             preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        rkt.started.append(proc)
        seen = b""
        deadline = time.time() + 240
        while b"/dev/pts/" not in seen and time.time() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        assert b"/dev/pts/" in seen, seen
        os.write(master, b"abc\r")
        assert proc.wait(120) == 6
        while select.select([master], [], [], 0.5)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
        assert b"got abc" in seen
    finally:
        os.close(master)
        os.close(slave)


def test_empty_and_host_volumes(rkt, busybox_aci, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in").write_text("from the host\n")
    script = "cat /data/in; echo from the pod > /data/out; grep ' /scratch ' /proc/mounts | cut -d' ' -f3"
    pod = rkt.pod(App(busybox_aci, mounts=[("data", "/data"), ("scratch", "/scratch")], **sh(script)),
                  volumes=[{"name": "data", "kind": "host", "source": str(shared)},
                           {"name": "scratch", "kind": "empty", "mode": "0755", "uid": 0, "gid": 0}])
    result = rkt.go(pod)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"from the host\ntmpfs\n"
    assert (shared / "out").read_text() == "from the pod\n"


# -- enter, stop ----------------------------------------------------------------------------------

def test_enter_then_stop(rkt, busybox_aci):
    pod = rkt.pod(App(busybox_aci, **SLEEPER))
    proc = rkt.start(pod)
    result = rkt.enter(pod, "busybox", ["/bin/sh", "-c", "echo in $AC_APP_NAME; cat; exit 5"], env=rkt.env,
                       input=b"typed\n")
    assert result.returncode == 5, result.stderr.decode()
    assert result.stdout == b"in busybox\ntyped\n"
    missing = rkt.enter(pod, "busybox", ["/bin/bash"], env=rkt.env)   # rkt enter's default command
    assert missing.returncode == 127 and b"/bin/bash" in missing.stderr
    assert rkt.running(pod)
    stopped = rkt.stop(pod, env=rkt.env)
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert proc.wait(60) == 143 and rkt.statuses(pod) == {"busybox": 143}
    assert not rkt.running(pod)
    assert rkt.stop(pod, env=rkt.env).returncode == 0   # an exited pod: nothing to do


def test_enter_on_a_terminal(rkt, busybox_aci):
    from tests.e2e.test_interact import PtySession

    pod = rkt.pod(App(busybox_aci, **SLEEPER))
    rkt.start(pod)
    pid = rkt.wait_pid(pod)
    argv = [str(pod.file("stage1/rootfs/kvmpod/enter")), f"--pid={pid}", "--appname=busybox", "--",
            "/bin/sh", "-c", "tty; stty size; read line; echo got $line; exit 9"]
    here = os.getcwd()
    os.chdir(pod.path)   # stage0 runs enter in the pod directory (PtySession takes no cwd)
    try:
        term = PtySession(argv, rkt.env, rows=33, cols=77)
    finally:
        os.chdir(here)
    try:
        assert b"/dev/pts/" in term.expect(b"/dev/pts/")
        term.expect(b"33 77")
        term.send(b"abc\r")
        term.expect(b"got abc")
        assert term.wait() == 9
    finally:
        term.close()
    assert rkt.stop(pod, force=True, env=rkt.env).returncode == 0


def test_stop_force(rkt, busybox_aci):
    pod = rkt.pod(App(busybox_aci, **SLEEPER))
    proc = rkt.start(pod)
    rkt.wait_pid(pod)
    stopped = rkt.stop(pod, force=True, env=rkt.env)
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert proc.wait(60) == 137 and rkt.statuses(pod) == {"busybox": 137}
    assert not rkt.running(pod)


def test_enter_with_the_wrong_pid_is_refused(rkt, busybox_aci):
    pod = rkt.pod(App(busybox_aci, **SLEEPER))
    rkt.start(pod)
    pid = rkt.wait_pid(pod)
    argv = [str(pod.file("stage1/rootfs/kvmpod/enter")), f"--pid={pid + 1}", "--appname=busybox", "--", "/bin/true"]
    result = subprocess.run(argv, cwd=pod.path, env=rkt.env, capture_output=True)
    assert result.returncode == 254
    assert errors(result) == [f"kvmpod-stage1: error: enter: --pid={pid + 1} is not this pod's process "
                              f"({pod.path}/pid: {pid})"]
    assert rkt.stop(pod, force=True, env=rkt.env).returncode == 0


# -- gc ----------------------------------------------------------------------------------------------

@pytest.fixture
def netns(kvmpod_env):
    from tests.e2e.test_net import Netns

    ns = Netns(kvmpod_env)
    yield ns
    subprocess.run(["ip", "netns", "del", ns.name], check=False)


@pytest.fixture(scope="module")
def web_aci(busybox_rootfs, tmp_path_factory) -> Path:
    """busybox with an appc port `http` (tcp/80), for a pod manifest's port forward."""
    from tests.conftest import kvmpod_cmd

    out = tmp_path_factory.mktemp("stage1-images") / "web.aci"
    subprocess.run(kvmpod_cmd("image", "build", "--rootfs", str(busybox_rootfs), "--name", "example.com/web",
                              "--exec", "/bin/httpd -f -p 80 -h /etc", "--port", "http:tcp:80", "-o", str(out)),
                   check=True)
    return out


def test_gc_after_a_sigkilled_run_releases_everything(rkt, web_aci, netns, kvmpod_env):
    pod = rkt.pod(App(web_aci), ports=[{"name": "http", "hostPort": 18080}])
    proc = rkt.start(pod, net="default", wrap=("ip", "netns", "exec", netns.name))
    rkt.wait_pid(pod)
    run_dir = Path(kvmpod_env["KVMPOD_RUN_DIR"])
    kvmpod_pod = run_dir / "pods" / pod.uuid
    held = netns.leftovers()   # its tap on the bridge, the port forward, the lease
    assert any("kvtap" in h for h in held) and any("18080" in h for h in held), held
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 10
    while (qemu_pids_of(str(run_dir)) or rkt.running(pod)) and time.time() < deadline:
        time.sleep(0.1)
    assert not rkt.running(pod) and qemu_pids_of(str(run_dir)) == []   # QEMU dies with its kvmpod
    assert kvmpod_pod.is_dir() and any("18080" in h for h in netns.leftovers())   # what a SIGKILL leaves for gc
    collected = subprocess.run(["ip", "netns", "exec", netns.name,
                                str(pod.file("stage1/rootfs/kvmpod/gc")), pod.uuid],
                               cwd=pod.path, env=kvmpod_env, capture_output=True)
    assert collected.returncode == 0, collected.stderr.decode()
    assert not kvmpod_pod.exists() and netns.leftovers() == []
    assert not list(run_dir.glob("**/*.sock"))
    again = subprocess.run([str(pod.file("stage1/rootfs/kvmpod/gc")), "--debug", pod.uuid], cwd=pod.path,
                           env=kvmpod_env, capture_output=True)
    assert again.returncode == 0, again.stderr.decode()   # idempotent


# -- what is refused before anything starts ----------------------------------------------------------

@pytest.mark.parametrize("damage, message", [
    (lambda p: subprocess.run(["rm", "-rf", str(p.file("stage1/rootfs/opt/stage2/busybox/rootfs"))], check=True),
     "kvmpod-stage1: error: app busybox: {path}/stage1/rootfs/opt/stage2/busybox/rootfs: no such directory "
     "(stage0 renders each app's rootfs there)"),
    (lambda p: p.file("pod").write_text('{"acKind": "PodManifest", "acVersion": "1.30.0", "apps": "busybox"}'),
     'kvmpod-stage1: error: {path}/pod: pod manifest: apps: "busybox" is not a list'),
])
def test_a_bad_pod_directory_starts_nothing(rkt, busybox_aci, kvmpod_env, damage, message):
    pod = rkt.pod(App(busybox_aci, **sh("exit 0")))
    damage(pod)
    result = rkt.go(pod)
    assert result.returncode == 254
    assert errors(result) == [message.format(path=pod.path)]
    assert not pod.file("pid").exists() and rkt.statuses(pod) == {}
    assert not (Path(kvmpod_env["KVMPOD_RUN_DIR"]) / "pods" / pod.uuid).exists()


def test_net_host_is_refused(rkt, busybox_aci):
    pod = rkt.pod(App(busybox_aci, **sh("exit 0")))
    result = rkt.go(pod, net="host")
    assert result.returncode == 254
    assert errors(result) == ["kvmpod-stage1: error: run: --net=host: a pod VM cannot share the host's network "
                              "namespace (use --net=default or a CNI network)"]


# -- CNI networks from rkt's config directories ---------------------------------------------------

def test_a_cni_network_from_rkts_local_config(rkt, busybox_aci, kvmpod_env, tmp_path):
    from tests.e2e.test_net_cni import PLUGINS, CniHost

    if not all((PLUGINS / p).exists() for p in ("bridge", "host-local")):
        pytest.skip("the CNI plugins bridge and host-local are not in /usr/lib/cni (containernetworking-plugins)")
    (tmp_path / "rkt-etc").mkdir()
    host = CniHost(kvmpod_env, tmp_path / "rkt-etc")   # its configs are in rkt-etc/net.d: --local-config's
    try:
        toml = tmp_path / "plugins.toml"   # kvmpod's own config names the plugins only, not the configs
        toml.write_text(f'[net]\ncni-plugin-path = ["{PLUGINS}"]\n')
        pod = rkt.pod(App(busybox_aci, **sh("ip -4 -o addr show eth0 | tr -s ' ' | cut -d' ' -f4")))
        argv = rkt.run_argv(pod, net="testnet", local_config=str(tmp_path / "rkt-etc"))
        result = rkt.run(pod, ["ip", "netns", "exec", host.name, *argv], env={**kvmpod_env, "KVMPOD_CONFIG": str(toml)})
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode().startswith("10.77.0.")
        assert host.leases() == [] and host.veths() == []   # released at the pod's end
    finally:
        host.delete()
