"""The pod's cgroup (kvmpod/vm/cgroup.py) without a VM: the limits from the VM's size, the host's layout
from mountinfo, the files written in a fake cgroupfs (v1, v2, hybrid), delegation for a user, the OOM
kill's report, removal and gc of strays."""

from __future__ import annotations

import dataclasses

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import pytest

from kvmpod.image.manifest import Isolator
from kvmpod.pod import registry
from kvmpod.pod.resources import app_resources, size_vm
from kvmpod.vm import cgroup
from kvmpod.vm.backend import VMExit
from kvmpod.vm.cgroup import MIB, Cgroup, limits_for
from kvmpod.vm.config import TCG_CACHE_MIB, VMConfig
from kvmpod.vm.qemu import QemuVM

UUID = "2b9c4b1e-0000-4000-8000-000000000001"

# -- the limits, from the VM's size -------------------------------------------------------------------


def cpu(limit: str) -> list[Isolator]:
    """An app's (or the pod's) isolators: one resource/cpu limit."""
    return [Isolator("resource/cpu", {"limit": limit})]


def test_memory_is_guest_ram_plus_the_measured_overhead_and_no_swap():
    limits = limits_for(256, 1)
    overhead = TCG_CACHE_MIB + cgroup.OVERHEAD_BASE_MIB + 2 + cgroup.OVERHEAD_PER_VCPU_MIB   # 256 MiB: 2 of 8 per GiB
    assert limits.memory_bytes == (256 + overhead) * MIB and limits.swap_bytes == 0
    # the translation cache is TCG's: under KVM it is not counted
    assert limits_for(256, 1, tcg=False).memory_bytes == limits.memory_bytes - TCG_CACHE_MIB * MIB
    # more RAM, more vCPUs, a virtiofsd: each adds its share
    big = limits_for(4096, 4, virtiofsd=2)
    assert big.memory_bytes == (4096 + TCG_CACHE_MIB + cgroup.OVERHEAD_BASE_MIB + 32 + 4 * cgroup.OVERHEAD_PER_VCPU_MIB
                                + 2 * cgroup.OVERHEAD_PER_VIRTIOFSD_MIB) * MIB


def test_the_test_hook_replaces_the_memory_limit(monkeypatch):
    monkeypatch.setenv("KVMPOD_CGROUP_MEMORY_MAX", "64M")
    assert limits_for(256, 1, memory_override=cgroup.memory_override()).memory_bytes == 64 * MIB
    monkeypatch.setenv("KVMPOD_CGROUP_MEMORY_MAX", "lots")
    with pytest.raises(Exception, match="KVMPOD_CGROUP_MEMORY_MAX"):
        cgroup.memory_override()
    monkeypatch.delenv("KVMPOD_CGROUP_MEMORY_MAX")
    assert cgroup.memory_override() is None


def test_pids_cover_qemus_and_each_virtiofsds_threads():
    one = limits_for(256, 1).pids
    assert one == cgroup.QEMU_TASKS + 1 + cgroup.TASK_HEADROOM
    assert limits_for(256, 4).pids == one + 3
    assert limits_for(256, 1, virtiofsd=2).pids == one + 2 * cgroup.VIRTIOFSD_TASKS
    assert one > 64 + 1 + 2   # QEMU's block thread pool, a vCPU, its main loop and RCU threads


@pytest.mark.parametrize("isolators, pod, cpus, vcpus, quota", [
    ([cpu("500m")], None, None, 1, 50_000),               # half a CPU: one vCPU, half its time
    ([cpu("250m"), cpu("250m")], None, None, 1, 50_000),   # two apps' limits add up
    ([cpu("1500m")], None, None, 2, 150_000),             # 1.5 CPUs: two vCPUs, 1.5 CPUs' time
    ([cpu("2")], None, None, 2, 200_000),                 # whole CPUs
    ([], None, None, 1, 100_000),                         # no limit: the vCPUs' worth
    ([], cpu("700m"), None, 1, 70_000),                   # the pod's limit when the apps have none
    ([cpu("500m")], None, 2, 2, 200_000),                 # --cpus wins, as it does for the vCPUs
    ([cpu("8")], None, None, 2, 200_000),                 # more than the host has: its CPUs bound both
])
def test_cpu_quota_from_the_isolators_and_cpus(isolators, pod, cpus, vcpus, quota):
    apps = [app_resources(f"a{i}", iso) for i, iso in enumerate(isolators)] or [app_resources("a", [])]
    size = size_vm(apps, app_resources("pod", pod) if pod else None, cpus=cpus, host_cpus=2)
    limits = limits_for(size.memory_mib, size.cpus, size.cpu_limit)
    assert (size.cpus, limits.cpu_quota_us, limits.cpu_period_us) == (vcpus, quota, 100_000)


def test_the_limits_describe_themselves():
    text = limits_for(256, 1, Decimal("0.5")).describe()
    assert "swap 0 MiB" in text and "cpu 0.5 CPUs (50000/100000 us)" in text and f"pids {limits_for(256, 1).pids}" in text


# -- the host's layout, from /proc/self/mountinfo -----------------------------------------------------

HYBRID = """\
31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / {root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / {root}/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / {root}/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / {root}/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_SELF = "9:name=systemd:/\n8:pids:/\n4:memory:/session/1\n1:cpu:/\n0::/\n"
V1 = """\
25 20 0:22 / {root} rw - tmpfs tmpfs rw
26 25 0:23 / {root}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
27 25 0:24 / {root}/memory rw - cgroup cgroup rw,memory
28 25 0:25 / {root}/pids rw - cgroup cgroup rw,pids
"""
V1_SELF = "3:pids:/\n2:memory:/\n1:cpu,cpuacct:/\n"
V2 = "30 23 0:26 / {root} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V2_SELF = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/term.scope\n"


class FakeCgroupFs:
    """Cgroup hierarchies in a temporary directory: a new directory is filled with a controller's
    files as the kernel would (a v2 one only with those its parent enables for it), and one with a
    process in its cgroup.procs cannot be removed."""

    V1_FILES = {"memory": {"memory.limit_in_bytes": "9223372036854771712\n", "memory.failcnt": "0\n",
                           "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"},
                "pids": {"pids.max": "max\n"},
                "cpu": {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n", "cpu.shares": "1024\n"}}
    V2_FILES = {"memory": {"memory.max": "max\n", "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"},
                "pids": {"pids.max": "max\n"}, "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"}}

    def __init__(self, root: Path, mountinfo: str, proc_self: str, v2_controllers: str = "",
                 swap_accounting: bool = True):
        self.root = root
        self.mountinfo_text = mountinfo.format(root=root)
        self.proc_self = proc_self
        self.swap = swap_accounting
        self.mounts: dict[Path, tuple[int, frozenset[str]]] = {}
        for version, mount, _, controllers in cgroup.parse_mountinfo(self.mountinfo_text):
            self.mounts[mount] = (version, controllers)
            mount.mkdir(parents=True)
            self.fill(mount, version, controllers if version == 1 else frozenset(v2_controllers.split()))

    def fill(self, d: Path, version: int, controllers: frozenset[str]) -> None:
        (d / "cgroup.procs").write_text("")
        if version == 2:
            (d / "cgroup.controllers").write_text(" ".join(sorted(controllers)) + "\n")
            (d / "cgroup.subtree_control").write_text("")
            for c in controllers:
                for name, text in self.V2_FILES.get(c, {}).items():
                    (d / name).write_text(text)
            if "memory" in controllers and self.swap:
                (d / "memory.swap.max").write_text("max\n")
                (d / "memory.oom.group").write_text("0\n")
            return
        for c in controllers:
            for name, text in self.V1_FILES[c].items():
                (d / name).write_text(text)
        if "memory" in controllers and self.swap:
            (d / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")

    def mkdir(self, path: Path, exist_ok: bool = False) -> None:
        if path.exists() and exist_ok:
            return
        os.mkdir(path)
        mount = next(m for m in self.mounts if path.is_relative_to(m))
        version, controllers = self.mounts[mount]
        if version == 2:   # what the parent enabled
            controllers = frozenset(w.lstrip("+") for w in (path.parent / "cgroup.subtree_control").read_text().split())
        self.fill(path, version, controllers)

    def rmdir(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if (path / "cgroup.procs").read_text().strip() or any(p.is_dir() for p in path.iterdir()):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        shutil.rmtree(path)

    def layout(self) -> cgroup.Layout:
        return cgroup.detect(self.mountinfo_text, self.proc_self)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    def make(mountinfo: str = HYBRID, proc_self: str = HYBRID_SELF, v2: str = "hugetlb", **kw) -> FakeCgroupFs:
        fs = FakeCgroupFs(tmp_path / "cgroup", mountinfo, proc_self, v2, **kw)
        monkeypatch.setattr(cgroup, "_mkdir", fs.mkdir)
        monkeypatch.setattr(cgroup, "_remove_dir", fs.rmdir)
        monkeypatch.setattr(cgroup, "host_layout", fs.layout)
        return fs
    return make


def test_this_machines_hybrid_layout_puts_each_controller_in_its_v1_hierarchy(fake):
    fs = fake()
    layout = fs.layout()
    assert layout.kind == "hybrid"
    assert {c: (h.version, h.mount.name) for c in cgroup.CONTROLLERS if (h := layout.place(c))} == {
        "memory": (1, "memory"), "pids": (1, "pids"), "cpu": (1, "cpu")}
    assert layout.place("memory").own == "/session/1"


def test_a_v2_only_host_puts_every_controller_in_the_one_tree(fake):
    fs = fake(V2, V2_SELF, v2="cpuset cpu io memory hugetlb pids rdma misc")
    layout = fs.layout()
    assert layout.kind == "v2"
    assert {layout.place(c).mount for c in cgroup.CONTROLLERS} == {fs.root}


def test_a_hybrid_host_with_memory_in_its_v2_tree_uses_it_there():
    text = HYBRID.replace("35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory\n", "")
    hybrid = FakeLayout(text, v2="memory")
    assert hybrid.place("memory").version == 2 and hybrid.place("pids").version == 1


def FakeLayout(mountinfo: str, v2: str) -> cgroup.Layout:
    layout = cgroup.detect(mountinfo.format(root="/nonexistent"), "0::/\n")
    return cgroup.Layout(tuple(h if h.version == 1 else cgroup.Hierarchy(2, h.mount, h.root, frozenset(v2.split()), "/")
                               for h in layout.hierarchies))


def test_a_v1_host_with_cpu_and_cpuacct_comounted(fake):
    fs = fake(V1, V1_SELF)
    layout = fs.layout()
    assert layout.kind == "v1"
    assert layout.place("cpu").mount == fs.root / "cpu,cpuacct"
    assert cgroup.detect("", "").kind == "none"


def test_mountinfo_escapes_and_a_containers_subtree():
    text = "41 31 0:38 /kubepods/pod1 /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n"
    ((version, mount, root, _),) = cgroup.parse_mountinfo(text)
    assert (version, mount, root) == (2, Path("/sys/fs/cgroup x"), "/kubepods/pod1")
    h = cgroup.Hierarchy(2, mount, root, frozenset(), "/kubepods/pod1/c1")
    assert h.directory("/kubepods/pod1/c1") == mount / "c1" and h.directory("/elsewhere") is None
    assert h.name(mount / "kvmpod" / "u") == "kubepods/pod1/kvmpod/u"


# -- making it: the files written, v1 and v2 ---------------------------------------------------------

def test_v1_every_controller_its_directory_and_files(fake):
    fs = fake()
    limits = limits_for(256, 1, Decimal("0.5"))
    made, notice = cgroup.create(UUID, limits, parent="kvmpod")
    assert notice == "" and made is not None
    assert made.name == f"kvmpod/{UUID}"
    mem, pids, cpu_dir = (fs.root / c / "kvmpod" / UUID for c in ("memory", "pids", "cpu"))
    assert (mem / "memory.limit_in_bytes").read_text() == str(limits.memory_bytes)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(limits.memory_bytes)   # no swap on top
    assert (pids / "pids.max").read_text() == str(limits.pids)
    assert ((cpu_dir / "cpu.cfs_quota_us").read_text(), (cpu_dir / "cpu.cfs_period_us").read_text()) == ("50000", "100000")
    assert made.procs_files == tuple(os.fsencode(d / "cgroup.procs") for d in (mem, pids, cpu_dir))
    assert made.controllers == ("cpu", "memory", "pids")


def test_a_cpu_weight_is_v1_cpu_shares(fake):
    fs = fake()
    limits = dataclasses.replace(limits_for(256, 1), cpu_weight=10)
    made, notice = cgroup.create(UUID, limits, parent="kvmpod")
    assert notice == "" and made is not None
    assert (fs.root / "cpu" / "kvmpod" / UUID / "cpu.shares").read_text() == "102"   # 1024 x 10 / 100
    assert Cgroup.from_record(json.loads(json.dumps(made.record()))) == made


def test_a_cpu_weight_is_v2_cpu_weight_and_none_leaves_the_default(fake):
    fs = fake(V2, "0::/init.scope\n", v2="cpu memory pids io")
    limits = dataclasses.replace(limits_for(256, 1), cpu_weight=10)
    made, notice = cgroup.create(UUID, limits, parent="kvmpod")
    assert notice == "" and (fs.root / "kvmpod" / UUID / "cpu.weight").read_text() == "10"
    plain, _ = cgroup.create("other", limits_for(256, 1), parent="kvmpod")
    assert (fs.root / "kvmpod" / "other" / "cpu.weight").read_text() == "100\n"   # left at the kernel's default


def test_v1_without_swap_accounting_sets_no_memsw(fake):
    fs = fake(swap_accounting=False)
    made, notice = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    assert notice == "" and not (fs.root / "memory" / "kvmpod" / UUID / "memory.memsw.limit_in_bytes").exists()


def test_v2_enables_the_controllers_down_to_the_pod_and_writes_its_limits(fake):
    fs = fake(V2, "0::/init.scope\n", v2="cpu memory pids io")
    limits = limits_for(512, 2, Decimal("1.5"))
    made, notice = cgroup.create(UUID, limits, parent="kvmpod")
    assert notice == "" and made is not None and made.name == f"kvmpod/{UUID}"
    assert set((fs.root / "cgroup.subtree_control").read_text().replace("+", "").split()) == {"cpu", "memory", "pids"}
    d = fs.root / "kvmpod" / UUID
    assert (d / "memory.max").read_text() == str(limits.memory_bytes)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "memory.oom.group").read_text() == "1"   # QEMU and its virtiofsd go together
    assert (d / "pids.max").read_text() == str(limits.pids)
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert made.procs_files == (os.fsencode(d / "cgroup.procs"),)
    assert made.dirs[0].controllers == ("memory", "pids", "cpu")


def test_v2_without_swap_accounting(fake):
    fs = fake(V2, "0::/\n", v2="cpu memory pids", swap_accounting=False)
    made, notice = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    assert notice == "" and not (fs.root / "kvmpod" / UUID / "memory.swap.max").exists()


def test_join_writes_the_callers_own_pid_as_0(fake, tmp_path):
    fake()
    made, _ = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    cgroup.join(made.procs_files)
    assert {Path(os.fsdecode(f)).read_text() for f in made.procs_files} == {"0"}


# -- what the host does not allow: one notice -------------------------------------------------------

def test_a_missing_controller_is_one_notice_and_the_others_are_used(fake):
    fake(V1.replace("28 25 0:25 / {root}/pids rw - cgroup cgroup rw,pids\n", ""), V1_SELF)
    made, notice = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    assert made is not None and made.controllers == ("cpu", "memory")
    assert notice == (f"the VM's cgroup kvmpod/{UUID} goes without pids (pids: not mounted): QEMU's tasks not "
                      "limited (docs/security.md)")


def test_no_controller_at_all_is_one_notice_and_no_cgroup(fake):
    made, notice = cgroup.create(UUID, limits_for(256, 1), layout=cgroup.Layout(()), parent="kvmpod")
    assert made is None
    assert notice == ("no cgroup for the VM (cpu, memory, pids: not mounted): QEMU runs without memory, task and "
                      "CPU limits (docs/security.md)")


def test_a_user_gets_the_top_of_the_subtree_delegated_to_it(fake, monkeypatch):
    fs = fake(V2, V2_SELF, v2="cpu memory pids")
    service = fs.root / "user.slice" / "user-1000.slice" / "user@1000.service"
    scope = service / "app.slice" / "term.scope"
    for d in (fs.root / "user.slice", fs.root / "user.slice/user-1000.slice", service, service / "app.slice", scope):
        d.mkdir()
        fs.fill(d, 2, frozenset({"cpu", "memory", "pids"}))
    (fs.root / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    (fs.root / "user.slice/user-1000.slice/cgroup.subtree_control").write_text("+memory +pids")
    (service / "cgroup.controllers").write_text("memory pids\n")   # systemd delegated these two
    monkeypatch.setattr(cgroup, "_writable", lambda d: d.is_relative_to(service))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    made, notice = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    assert made is not None and made.dirs[0].path == service / "kvmpod" / UUID
    assert made.name == f"user.slice/user-1000.slice/user@1000.service/kvmpod/{UUID}"
    assert made.controllers == ("memory", "pids")
    assert notice.startswith(f"the VM's cgroup {made.name} goes without cpu (cpu: not available in {service})")


def test_a_user_without_a_delegated_subtree_gets_no_cgroup(fake, monkeypatch):
    fake(V2, V2_SELF, v2="cpu memory pids")
    monkeypatch.setattr(cgroup, "_writable", lambda d: False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    made, notice = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    assert made is None
    assert notice == ("no cgroup for the VM (cpu, memory, pids: not root, and no cgroup is delegated to uid 1000): "
                      "QEMU runs without memory, task and CPU limits (docs/security.md)")


def test_a_limit_the_kernel_refuses_drops_that_controller_and_leaves_nothing_of_it(fake, monkeypatch):
    fs = fake()
    real_write = cgroup._write

    def refuse_cpu(path, value):
        if path.name == "cpu.cfs_quota_us":   # e.g. above a parent's quota
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        real_write(path, value)

    monkeypatch.setattr(cgroup, "_write", refuse_cpu)
    made, notice = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    assert made is not None and made.controllers == ("memory", "pids")
    assert "goes without cpu" in notice and "Invalid argument" in notice and "CPU time not limited" in notice
    assert not (fs.root / "cpu" / "kvmpod").exists()


def test_the_switch_turns_it_off(fake, tmp_path, monkeypatch):
    fs = fake()
    config = tmp_path / "kvmpod.toml"
    config.write_text("[security]\ncgroup = false\n")
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    assert cgroup.for_vm(UUID, limits_for(256, 1)) == (
        None, f"QEMU runs without a cgroup: [security] cgroup = false in {config} (for measuring only)")
    assert not (fs.root / "memory" / "kvmpod").exists()
    config.write_text("[security]\ncgroup = 'no'\n")
    with pytest.raises(Exception, match=r"\[security\] cgroup.*not true or false"):
        cgroup.for_vm(UUID, limits_for(256, 1))


def test_the_parent_is_kvmpod_unless_the_runtime_dir_is_another(monkeypatch, tmp_path):
    monkeypatch.delenv("KVMPOD_RUN_DIR", raising=False)
    assert cgroup.parent_name() == "kvmpod"
    monkeypatch.setenv("KVMPOD_RUN_DIR", str(tmp_path))
    name = cgroup.parent_name()
    assert name.startswith("kvmpod-") and len(name) == 15 and name == cgroup.parent_name(tmp_path)
    assert cgroup.parent_name(tmp_path / "other") != name


# -- state.json, the OOM kill, removal -----------------------------------------------------------------

def test_the_record_in_state_json_reads_back(fake):
    fake()
    made, _ = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    record = json.loads(json.dumps(made.record()))
    assert record["name"] == f"kvmpod/{UUID}"
    assert record["controllers"]["memory"] == {"path": str(made.dirs[0].path), "version": 1}
    assert record["limits"]["swap_bytes"] == 0
    assert Cgroup.from_record(record) == made
    assert Cgroup.from_record(None) is None and Cgroup.from_record({"name": "x"}) is None
    elsewhere = {**record, "controllers": {"memory": {"path": "/sys/fs/cgroup/memory/system/x", "version": 1}}}
    assert Cgroup.from_record(elsewhere) is None   # never another's cgroup, whatever a state.json says


def test_an_oom_kill_is_counted_from_v1_oom_control_or_failcnt_and_v2_memory_events(tmp_path):
    limits = limits_for(256, 1, memory_override=300 * MIB)
    d = tmp_path / "m"
    d.mkdir()
    v1 = Cgroup(f"kvmpod/{UUID}", (cgroup.CgroupDir(d, 1, ("memory",)),), limits)
    (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert v1.oom_kills() == 1
    (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")   # before Linux 4.13
    (d / "memory.failcnt").write_text("3\n")
    assert v1.oom_kills() == 3
    v2 = Cgroup(f"kvmpod/{UUID}", (cgroup.CgroupDir(d, 2, ("memory", "pids")),), limits)
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 2\n")
    assert v2.oom_kills() == 2
    assert Cgroup("x", (cgroup.CgroupDir(d, 1, ("pids",)),), limits).oom_kills() == 0   # no memory controller
    assert v2.oom_message() == f"the pod's VM exceeded its memory limit of 300 MiB (cgroup kvmpod/{UUID})"
    maker = Cgroup("kvmpod/snapshot-12-abcdef01", v2.dirs, limits)
    assert maker.oom_message().startswith("the boot snapshot's VM exceeded its memory limit of 300 MiB")


def test_a_qemu_sigkilled_by_the_oom_killer_is_reported_as_that(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "memory.oom_control").write_text("oom_kill 0\n")
    limits = limits_for(256, 1)
    made = Cgroup(f"kvmpod/{UUID}", (cgroup.CgroupDir(d, 1, ("memory",)),), limits)
    vm = QemuVM(VMConfig(name="t", kernel=Path("/k"), initrd=Path("/i"), cmdline="", console_log=Path("/c")),
                tmp_path / "qemu.log", cgroup=made)
    assert vm._over_memory_limit(-signal.SIGKILL) == ""   # `kvmpod stop --force`: no OOM kill counted
    (d / "memory.oom_control").write_text("oom_kill 1\n")
    assert vm._over_memory_limit(-signal.SIGTERM) == ""
    message = vm._over_memory_limit(-signal.SIGKILL)
    assert message == f"the pod's VM exceeded its memory limit of {limits.memory_bytes >> 20} MiB (cgroup kvmpod/{UUID})"
    # what the runner says of a VM that ended with it (kvmpod/pod/runner.py _explain_death, QemuVM._race)
    vm_exit = VMExit(-signal.SIGKILL, failure=message, over_limit=True)
    assert vm_exit.describe() == message and not vm_exit.clean


def test_removal_waits_for_processes_to_leave_and_takes_the_empty_parent(fake):
    fs = fake()
    made, _ = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    other, _ = cgroup.create("other", limits_for(256, 1), parent="kvmpod")
    mem = made.dirs[0].path
    (mem / "cgroup.procs").write_text("4242\n")   # a QEMU still exiting
    assert not made.remove(wait=0.05) and mem.is_dir()
    (mem / "cgroup.procs").write_text("")
    assert made.remove() and not any(d.path.exists() for d in made.dirs)
    assert (fs.root / "memory" / "kvmpod").is_dir()   # another pod's cgroup is in it
    assert other.remove() and not (fs.root / "memory" / "kvmpod").exists()
    assert made.remove()   # again: nothing to do


def test_creation_survives_another_pod_removing_the_empty_parent_meanwhile(fake, monkeypatch):
    fs = fake()
    real = fs.mkdir
    taken = []

    def racing_mkdir(path, exist_ok=False):
        real(path, exist_ok)
        if path.name == "kvmpod" and not taken:   # the last other pod ends just now
            taken.append(path)
            fs.rmdir(path)

    monkeypatch.setattr(cgroup, "_mkdir", racing_mkdir)
    made, notice = cgroup.create(UUID, limits_for(256, 1), parent="kvmpod")
    assert notice == "" and all(d.path.is_dir() for d in made.dirs)


def test_gc_sweeps_the_empty_cgroups_of_pods_and_makers_that_are_gone(fake, run_dir):
    fs = fake()
    parent = cgroup.parent_name()
    live = run_dir / "pods" / "live-pod"
    live.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = ["live-pod", "gone-pod", "busy-pod", f"snapshot-{os.getpid()}-0123abcd", f"snapshot-{dead.pid}-0123abcd"]
    for name in names:
        cgroup.create(name, limits_for(256, 1), parent=parent)
    (fs.root / "memory" / parent / "busy-pod" / "cgroup.procs").write_text("4242\n")
    assert registry.sweep_cgroups() == ["gone-pod", f"snapshot-{dead.pid}-0123abcd"]
    assert sorted(p.name for p in (fs.root / "memory" / parent).iterdir() if p.is_dir()) == sorted(
        ["busy-pod", "live-pod", f"snapshot-{os.getpid()}-0123abcd"])
    # the busy one is busy in its memory hierarchy only: the others' copies of it go
    assert sorted(p.name for p in (fs.root / "pids" / parent).iterdir() if p.is_dir()) == sorted(
        ["live-pod", f"snapshot-{os.getpid()}-0123abcd"])


def test_gc_of_a_dead_pod_removes_its_recorded_cgroup(fake, run_dir):
    fs = fake()
    made, _ = cgroup.create("deadpod1", limits_for(256, 1), parent=cgroup.parent_name())
    dead = subprocess.Popen(["true"])
    dead.wait()
    pod = run_dir / "pods" / "deadpod1"
    pod.mkdir(parents=True)
    (pod / "state.json").write_text(json.dumps({"uuid": "deadpod1", "state": "running", "kvmpod_pid": dead.pid,
                                                "cgroup": made.record()}))
    listed = registry.find_pod("deadpod1").summary()
    assert listed["cgroup"]["name"] == made.name   # what `kvmpod status --json` shows
    assert registry.gc() == ["deadpod1"]
    assert not any(d.path.exists() for d in made.dirs)
    assert not (fs.root / "memory" / cgroup.parent_name()).exists()


def test_gc_sweeps_other_runtime_dirs_empty_cgroups_once_an_hour_old(fake, run_dir):
    fs = fake()
    mine = cgroup.parent_name()
    for parent, leaf in ((mine, "fresh-of-mine"), ("kvmpod-0badf00d", "old"), ("kvmpod-0badf00d", "busy"),
                         ("kvmpod-0badf00d", "new"), ("kvmpod", "production")):
        cgroup.create(leaf, limits_for(256, 1), parent=parent)
    hour_ago = time.time() - 3601
    for d in (fs.root / "memory" / "kvmpod-0badf00d").iterdir():
        if d.name in ("old", "busy"):
            os.utime(d, (hour_ago, hour_ago))
    os.utime(fs.root / "memory" / "kvmpod" / "production", (hour_ago, hour_ago))
    (fs.root / "memory" / "kvmpod-0badf00d" / "busy" / "cgroup.procs").write_text("4242\n")
    assert cgroup.sweep_other_parents() == ["kvmpod-0badf00d/old"]
    left = {p.name for p in (fs.root / "memory" / "kvmpod-0badf00d").iterdir() if p.is_dir()}
    assert left == {"busy", "new"}
    assert (fs.root / "memory" / "kvmpod" / "production").is_dir()   # the default runtime dir's: never
    assert (fs.root / "memory" / mine / "fresh-of-mine").is_dir()    # this runtime dir's: by its pods (sweep)
