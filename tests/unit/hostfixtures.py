"""Fixture hosts: a directory tree with the files kvmpod's host detection reads (/proc/cpuinfo,
/sys/module/kvm*/parameters, /dev/kvm, /dev/vhost-*, /proc/self/mountinfo and cgroup, the cgroup
mounts), for the accelerator choice (kvmpod/vm/accel.py) and `kvmpod doctor` (kvmpod/doctor.py).

The device nodes are plain files: detection only checks that they exist and may be opened
read-write, which a file in the tree answers as a device would."""

from __future__ import annotations

from pathlib import Path

INTEL_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat clflush mmx fxsr sse sse2 ss ht syscall nx lm"
CPUINFO = """processor\t: {n}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU
flags\t\t: {flags}

"""

# the host kinds of kvmpod/vm/accel.py's kvm_kind
HOSTS = {
    "real": dict(flags=INTEL_FLAGS + " vmx", modules={"kvm": {}, "kvm_intel": {"nested": "Y"}}, dev_kvm=True),
    "nested": dict(flags=INTEL_FLAGS + " vmx hypervisor", modules={"kvm": {}, "kvm_intel": {"nested": "N"}},
                   dev_kvm=True),
    "nested-amd": dict(flags=INTEL_FLAGS + " svm hypervisor", modules={"kvm": {}, "kvm_amd": {"nested": "1"}},
                       dev_kvm=True),
    "pvm": dict(flags=INTEL_FLAGS + " hypervisor", modules={"kvm": {}, "kvm_pvm": {}}, dev_kvm=True),
    "no-dev-kvm": dict(flags=INTEL_FLAGS + " hypervisor", modules={}, dev_kvm=False),
}


def cgroup_v2(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids") -> tuple[str, str]:
    """A unified cgroup v2 tree under root/sys/fs/cgroup: (mountinfo, /proc/self/cgroup) texts."""
    mount = root / "sys/fs/cgroup"
    mount.mkdir(parents=True, exist_ok=True)
    (mount / "cgroup.controllers").write_text(controllers + "\n")
    (mount / "cgroup.procs").write_text("")
    (mount / "cgroup.subtree_control").write_text("")
    return (f"35 24 0:30 / {mount} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n", "0::/\n")


def cgroup_v1(root: Path) -> tuple[str, str]:
    """A legacy v1-only layout (no cgroup2 mount): memory, pids and cpu hierarchies."""
    lines, own = [], []
    for i, c in enumerate(("memory", "pids", "cpu,cpuacct")):
        mount = root / "sys/fs/cgroup" / c
        mount.mkdir(parents=True, exist_ok=True)
        (mount / "cgroup.procs").write_text("")
        lines.append(f"{40 + i} 24 0:{40 + i} / {mount} rw,nosuid - cgroup cgroup rw,{c}\n")
        own.append(f"{i + 2}:{c}:/\n")
    return "".join(lines), "".join(own)


def make_host(root: Path, kind: str, vhost: bool = False, cgroups: str = "v2") -> Path:
    """Write fixture host `kind` (HOSTS) under `root`; `vhost`: /dev/vhost-vsock and /dev/vhost-net too;
    `cgroups`: "v2", "v1" or "none"."""
    host = HOSTS[kind]
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/cpuinfo").write_text("".join(CPUINFO.format(n=n, flags=host["flags"]) for n in range(2)))
    for module, params in host["modules"].items():  # type: ignore[attr-defined]
        (root / "sys/module" / module / "parameters").mkdir(parents=True, exist_ok=True)
        for name, value in params.items():
            (root / "sys/module" / module / "parameters" / name).write_text(value + "\n")
    (root / "dev/net").mkdir(parents=True, exist_ok=True)
    (root / "dev/net/tun").write_text("")
    if host["dev_kvm"]:
        (root / "dev/kvm").write_text("")
    if vhost:
        (root / "dev/vhost-vsock").write_text("")
        (root / "dev/vhost-net").write_text("")
    mountinfo, own = {"v2": cgroup_v2, "v1": cgroup_v1}[cgroups](root) if cgroups != "none" else ("", "")
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/self/cgroup").write_text(own)
    (root / "proc/sys/user").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/user/max_user_namespaces").write_text("63000\n")
    return root
