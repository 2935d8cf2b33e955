"""What only the libvirt backend has (docs/libvirt.md): its daemon's errors, a domain libvirt ends, gc of
a domain whose kvmpod was killed, `virsh list`. Real VMs, a real libvirt daemon (conftest.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from kvmpod.vm.transport import vhost_vsock_unusable
from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import proc_alive, the_error
from tests.e2e.libvirt.conftest import BackendKvmpod, domains, virsh

SH = ["--exec", "/bin/sh", "--", "-c"]


def libvirt_pods(kvmpod_env, uri) -> BackendKvmpod:
    return BackendKvmpod(kvmpod_env, ["--backend", "libvirt", "--libvirt-uri", uri])


def test_a_daemon_that_is_not_there_is_one_line_naming_the_uri(kvmpod_env, busybox_aci, tmp_path, libvirt_uri):
    uri = f"qemu:///system?socket={tmp_path}/no-daemon-here"
    result = libvirt_pods(kvmpod_env, uri).run("--net", "none", str(busybox_aci), *SH, "true")
    assert result.returncode == 125
    error = the_error(result)
    assert uri in error and "Failed to connect socket" in error
    assert list(Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods").glob("*")) == []


def test_a_uri_the_daemon_refuses_is_one_line_naming_it(kvmpod_env, busybox_aci, libvirt_uri):
    uri = "test+unix:///nonexistent-driver"
    result = libvirt_pods(kvmpod_env, uri).run("--net", "none", str(busybox_aci), *SH, "true")
    assert result.returncode == 125 and uri in the_error(result)


def test_flags_the_libvirt_backend_cannot_take_are_refused_by_name(kvmpod_env, busybox_aci, libvirt_uri):
    pods = libvirt_pods(kvmpod_env, libvirt_uri)
    for args, flag in ((["--boot", "snapshot"], "--boot snapshot"), (["--agent-transport", "vsock"], "--agent-transport"),
                       (["--net", "kvt-cni-net"], "--net kvt-cni-net")):
        result = pods.run("--net", "none", *args, str(busybox_aci), *SH, "true")
        assert result.returncode == 125 and flag in the_error(result), result.stderr
    assert domains(libvirt_uri) == []


def test_the_running_pod_is_in_virsh_list_and_virsh_destroy_ends_it(kvmpod_env, busybox_aci, libvirt_uri):
    pods = libvirt_pods(kvmpod_env, libvirt_uri)
    proc = pods.popen("--net", "none", str(busybox_aci), *SH, "sleep 600")
    try:
        state = pods.wait_for_running_pod(proc)
        name = f"kvmpod-{state['uuid'][:8]}"
        assert state["domain"] == name and state["backend"] == "libvirt"
        assert name in virsh(libvirt_uri, "list", "--name").stdout.split()
        metadata = virsh(libvirt_uri, "dumpxml", name).stdout
        assert state["uuid"] in metadata and str(Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods", state["uuid"])) in metadata
        # libvirt's DAC driver chowned what the domain uses to its QEMU user, but not the shared files: the
        # store's images (relabel='no') and the kernel cache (the domain has copies)
        store_images = list(Path(kvmpod_env["KVMPOD_STORE_DIR"]).glob("rootfs/*.iso"))
        assert store_images and all(p.stat().st_uid == 0 for p in store_images)
        pod_dir = Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods", state["uuid"])
        assert (pod_dir / "libvirt-kernel").stat().st_uid != 0   # the copy is libvirt's QEMU user's now
        virsh(libvirt_uri, "destroy", name)
        _, err = proc.communicate(timeout=60)   # a hang fails here; how fast belongs to bench/
        assert proc.returncode == 125
        assert f"libvirt destroyed domain {name}" in err.decode()
    finally:
        proc.kill()
        proc.wait()


def test_guest_kernel_panic_is_reported(kvmpod_env, busybox_aci, libvirt_uri):
    result = libvirt_pods(kvmpod_env, libvirt_uri).run("--net", "none", str(busybox_aci), *SH,
                                                       "echo c > /proc/sysrq-trigger; sleep 60")
    assert result.returncode == 125
    assert "kernel panicked" in the_error(result)


def test_kvmpod_killed_then_gc_destroys_the_domain(kvmpod_env, busybox_aci, libvirt_uri):
    """A guest whose kvmpod is gone powers off once its agent's port hangs up; one that cannot (here:
    paused) keeps its domain, which `kvmpod gc` destroys."""
    pods = libvirt_pods(kvmpod_env, libvirt_uri)
    proc = pods.popen("--net", "none", str(busybox_aci), *SH, "sleep 600")
    state = pods.wait_for_running_pod(proc)
    name = state["domain"]
    virsh(libvirt_uri, "suspend", name)
    proc.kill()
    proc.wait()
    assert name in domains(libvirt_uri)   # a libvirt domain does not die with its kvmpod...
    listed = subprocess.run(kvmpod_cmd("list"), capture_output=True, text=True, env=kvmpod_env).stdout
    assert f"{state['uuid']}  abandoned" in listed and f"libvirt:{name}" in listed
    gc = subprocess.run(kvmpod_cmd("gc"), capture_output=True, text=True, env=kvmpod_env)
    assert gc.returncode == 0 and f"removed pod {state['uuid']}" in gc.stdout, gc.stderr
    assert f"destroyed its libvirt domain {name}" in gc.stderr
    assert not Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods", state["uuid"]).exists()
    deadline = time.time() + 15
    while name in domains(libvirt_uri) and time.time() < deadline:   # ...but goes with gc
        time.sleep(0.2)
    assert name not in domains(libvirt_uri)
    assert not proc_alive(state["qemu_pid"]) if state.get("qemu_pid") else True


def test_gc_leaves_a_domain_of_the_same_name_that_is_not_the_pods(kvmpod_env, busybox_aci, libvirt_uri, tmp_path):
    """gc finds a pod's domain by kvmpod's metadata (UUID and directory), never by its name alone."""
    pods = libvirt_pods(kvmpod_env, libvirt_uri)
    proc = pods.popen("--net", "none", str(busybox_aci), *SH, "sleep 600")
    state = pods.wait_for_running_pod(proc)
    virsh(libvirt_uri, "suspend", state["domain"])   # the guest stays, as above
    proc.kill()
    proc.wait()
    pod_dir = Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods", state["uuid"])
    record = json.loads((pod_dir / "state.json").read_text())
    record["uuid"] = "00000000-0000-4000-8000-000000000000"   # not this domain's pod any more
    other = pod_dir.with_name(record["uuid"])
    pod_dir.rename(other)
    (other / "state.json").write_text(json.dumps(record))
    try:
        gc = subprocess.run(kvmpod_cmd("gc"), capture_output=True, text=True, env=kvmpod_env)
        assert gc.returncode == 0, gc.stderr
        assert state["domain"] in domains(libvirt_uri)   # not this pod's, by its metadata: left alone
    finally:
        virsh(libvirt_uri, "destroy", state["domain"], check=False)


def test_the_python_api_runs_a_pod_on_libvirt(kvmpod_env, busybox_aci, libvirt_uri):
    import kvmpod

    pod = kvmpod.Pod(kvmpod.App(str(busybox_aci), exec="/bin/sh", args=["-c", "echo from-api; exit 6"]),
                     net="none", backend="libvirt", libvirt_uri=libvirt_uri)
    result = pod.run()
    assert (result.exit_code, result.stdout) == (6, b"from-api\n"), result.stderr


def test_the_distro_kernel_on_pc_with_a_user_network(kvmpod_env, busybox_aci, libvirt_uri):
    """pc with virtio-pci (the distro kernel has no microvm): libvirt's PCI slots and kvmpod's NIC in
    <qemu:commandline> side by side."""
    from kvmpod.boot.kernel import cached_kernels

    if not any(k.kind == "distro" for k in cached_kernels()):
        pytest.skip("the distro kernel is not cached (make kernel-distro)")
    result = libvirt_pods(kvmpod_env, libvirt_uri).run(
        "--kernel", "distro", "--net", "user", str(busybox_aci),
        *SH, "ip -4 addr show eth0 | grep -o 'inet [0-9.]*'; exit 4")
    assert result.returncode == 4, result.stderr
    assert result.stdout == b"inet 10.0.2.15\n"


def test_a_panic_on_pc_is_reported(kvmpod_env, busybox_aci, libvirt_uri):
    from kvmpod.boot.kernel import cached_kernels

    if not any(k.kind == "distro" for k in cached_kernels()):
        pytest.skip("the distro kernel is not cached (make kernel-distro)")
    result = libvirt_pods(kvmpod_env, libvirt_uri).run("--kernel", "distro", "--net", "none", str(busybox_aci), *SH,
                                                       "echo c > /proc/sysrq-trigger; sleep 60")
    assert result.returncode == 125
    assert "kernel panicked" in the_error(result)


def test_doctor_reports_the_libvirt_daemon_the_configured_backend_would_use(kvmpod_env, libvirt_uri, tmp_path):
    """`kvmpod doctor` asks the daemon at the URI `kvmpod run` would use ([vm] libvirt-uri): ok when it answers;
    a daemon that is not there blocks pods only when [vm] backend is libvirt."""
    def doctor(config: str) -> subprocess.CompletedProcess:
        path = tmp_path / "kvmpod.toml"
        path.write_text(config)
        return subprocess.run(kvmpod_cmd("doctor", "--json"), env={**kvmpod_env, "KVMPOD_CONFIG": str(path)},
                              capture_output=True, timeout=60)

    def libvirt_check(result: subprocess.CompletedProcess) -> dict:
        return {c["name"]: c for c in json.loads(result.stdout)["checks"]}["libvirt"]

    answering = doctor(f'[vm]\nbackend = "libvirt"\nlibvirt-uri = "{libvirt_uri}"\n')
    assert answering.returncode == 0, answering.stderr
    check = libvirt_check(answering)
    assert check["status"] == "ok" and check["value"] == libvirt_uri and "answers" in check["reason"]
    absent = f"qemu:///system?socket={tmp_path}/no-daemon-here"
    blocked = doctor(f'[vm]\nbackend = "libvirt"\nlibvirt-uri = "{absent}"\n')
    assert blocked.returncode == 1 and libvirt_check(blocked)["status"] == "fail"
    assert absent in libvirt_check(blocked)["reason"] and json.loads(blocked.stdout)["blocking"] == ["libvirt"]
    noted = doctor(f'[vm]\nlibvirt-uri = "{absent}"\n')   # the QEMU backend is the default: only a note
    assert noted.returncode == 0 and libvirt_check(noted)["status"] == "note"


@pytest.mark.skipif(vhost_vsock_unusable() is not None,
                    reason=f"the libvirt domain's <vsock> is the kernel's vhost-vsock: {vhost_vsock_unusable()}")
def test_the_agent_over_the_kernels_vsock(kvmpod_env, busybox_aci, libvirt_uri):
    pods = libvirt_pods(kvmpod_env, libvirt_uri)
    uuid = pods.detach("--net", "none", "--agent-transport", "vhost-vsock", str(busybox_aci), "--exec", "/bin/sleep",
                       "--", "600")
    try:
        status = json.loads(pods.cmd("status", "--json", uuid).stdout)
        state = json.loads(Path(status["path"], "state.json").read_text())
        assert state["agent_transport"] == "vhost-vsock", state
        xml = virsh(libvirt_uri, "dumpxml", status["domain"]).stdout
        assert "<vsock model='virtio'>" in xml and "<channel type='unix'>" not in xml
        entered = pods.cmd("enter", uuid, "--", "/bin/sh", "-c", "echo over vsock; exit 3")
        assert entered.returncode == 3 and entered.stdout == b"over vsock\n"
    finally:
        pods.cmd("stop", uuid)
        pods.cmd("rm", uuid)
    assert domains(libvirt_uri) == []
