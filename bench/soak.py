"""Soak (section `11. soak` of `make bench`; a shortened run is tests/e2e/test_soak.py): many pods one after
the other, then waves of concurrent ones, mixed (a plain exit code, stdin, a host volume, user networking,
detach + stop); every pod's exit code checked, and what could accumulate sampled as it goes:

    our_procs     processes of this soak's runtime dir: kvmpod, QEMU, virtiofsd, kvmpod-relay
    run_entries   files under the private runtime dir (pods, sockets, CID locks, leases...)
    store_bytes   the private store's size
    detached_fds, detached_threads   a detached pod's kvmpod process (or kvmpod-relay), sampled before its stop
    host_procs, links, netns, nft_lines   the machine's (other work on the machine moves these too)

Each must be flat: slope() gives its least-squares slope per 100 pods. leftovers() is the zero-leak check
the fault tests use too (tests/e2e/test_faults.py): what a pod left once it is over and `kvmpod gc` ran.
Not a test; asserts nothing (the test does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kvmpod.store import Store  # noqa: E402
from kvmpod.store.check import check  # noqa: E402
from kvmpod.vm.cgroup import parent_name, sweep  # noqa: E402

KVMPOD = [sys.executable, "-m", "kvmpod"]
SH = ["--exec", "/bin/sh", "--", "-c"]
KINDS = ("exit", "stdin", "volume", "user-net", "detach")
POD_TIMEOUT = 300


def private_env(base: Path) -> dict[str, str]:
    """A store, runtime dir and snapshot cache of their own under `base` (and --net none by default)."""
    config = base / "config" / "kvmpod" / "kvmpod.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('[net]\ndefault = "none"\n')
    return {**os.environ, "KVMPOD_STORE_DIR": str(base / "store"), "KVMPOD_RUN_DIR": str(base / "run"),
            "KVMPOD_SNAPSHOT_DIR": str(base / "snapshots"), "KVMPOD_AUDIT_LOG": str(base / "audit.log"),
            "XDG_CONFIG_HOME": str(base / "config")}


def kvmpod(env: dict[str, str], *args: str, input: bytes | None = None,
           timeout: float = POD_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*KVMPOD, *args], input=input, capture_output=True, env=env, timeout=timeout)


# -- what a pod can leave --------------------------------------------------------------------------------

def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ_has(pid: str, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def our_processes(env: dict[str, str]) -> list[str]:
    """Processes of this runtime dir: QEMU and virtiofsd name it on their command line, kvmpod (and
    kvmpod-relay, the same process) has it in its environment."""
    run_dir = env["KVMPOD_RUN_DIR"]
    entry = f"KVMPOD_RUN_DIR={run_dir}".encode()
    me = str(os.getpid())
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and p != me):
        cmd = _cmdline(pid)
        if run_dir in cmd or (_environ_has(pid, entry) and " -m pytest" not in cmd):
            found.append(f"{pid} {cmd[:160]}")
    return found


def cgroups_of(run_dir: str) -> list[str]:
    parent = parent_name(Path(run_dir))
    root = Path("/sys/fs/cgroup")
    return sorted(str(p) for pattern in (f"*/{parent}/*/", f"{parent}/*/") for p in root.glob(pattern))


def mounts_under(base: Path) -> list[str]:
    prefix = str(base.resolve())
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def leftovers(env: dict[str, str], base: Path | None = None) -> list[str]:
    """Everything of this env's pods still there, one line each ([] is a clean machine): processes, pod
    directories, sockets and other files in the runtime dir, snapshot makers' leftovers, cgroups, mounts
    under `base`, and whatever `kvmpod image fsck` finds in the store."""
    run = Path(env["KVMPOD_RUN_DIR"])
    found = [f"process {p}" for p in our_processes(env)]
    pods = run / "pods"
    found += [f"pod directory {p.name}" for p in (sorted(pods.iterdir()) if pods.is_dir() else [])]
    for path in sorted(run.rglob("*")) if run.is_dir() else []:
        rel = path.relative_to(run)
        if rel.parts[0] in ("pods", "qemu-root", "start-slots"):   # pods: above; qemu-root: QEMU's chroot, kept
            continue        # (security.md); start-slots: N lock files, made once (kvmpod/pod/admission.py)
        if rel.parts[0] == "net" and not path.name[0].isdigit():   # a pool's lock and last_reserved_ip stay
            continue                                                # (docs/layout.md); a lease is an address
        if path.is_socket() or path.is_file() or rel.parts[0].startswith("snapshot-"):
            found.append(f"runtime file {rel}")
    snapshots = Path(env["KVMPOD_SNAPSHOT_DIR"])
    found += [f"snapshot stage {p.name}" for p in (snapshots.glob("*.new-*") if snapshots.is_dir() else [])]
    found += [f"cgroup {c}" for c in cgroups_of(str(run))]
    if base is not None:
        found += [f"mount {m}" for m in mounts_under(base)]
    store = Store(Path(env["KVMPOD_STORE_DIR"]))
    found += [f"store: {p.line()}" for p in check(store)]
    found += [f"store temp file {p.name}" for p in (sorted(store.tmp.iterdir()) if store.tmp.is_dir() else [])]
    return found


# -- sampling --------------------------------------------------------------------------------------------

def _count(path: str) -> int:
    try:
        return len(os.listdir(path))
    except OSError:
        return 0


def _nft_lines() -> int:
    if shutil.which("nft") is None:
        return 0
    out = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    return len(out.splitlines())


def _tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def _run_entries(run: Path) -> int:
    """Files and pod directories in the runtime dir (not QEMU's chroot, the start slots or the directories
    made once)."""
    if not run.is_dir():
        return 0
    return sum(1 for p in run.rglob("*") if p.relative_to(run).parts[0] not in ("qemu-root", "start-slots")
               and (not p.is_dir() or p.parent.name == "pods"))


def machine_sample(env: dict[str, str]) -> dict[str, int]:
    return {"our_procs": len(our_processes(env)), "run_entries": _run_entries(Path(env["KVMPOD_RUN_DIR"])),
            "store_bytes": _tree_bytes(Path(env["KVMPOD_STORE_DIR"])),
            "host_procs": sum(1 for p in os.listdir("/proc") if p.isdigit()),
            "links": _count("/sys/class/net"), "netns": _count("/run/netns"), "nft_lines": _nft_lines()}


def process_sample(pid: int) -> dict[str, int]:
    return {"detached_fds": _count(f"/proc/{pid}/fd"), "detached_threads": _count(f"/proc/{pid}/task")}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x, per 100 x (0.0 with fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 100 * sum((x - mx) * (y - my) for x, y in points) / sxx


# -- the pods ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    kind: str
    index: int
    ok: bool
    detail: str = ""


@dataclass
class SoakResult:
    pods: int = 0
    wrong: list[Outcome] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)   # each with "pods": pods done so far
    seconds: float = 0.0

    def slopes(self) -> dict[str, float]:
        keys = sorted({k for s in self.samples for k in s} - {"pods"})
        return {k: round(slope([(s["pods"], s[k]) for s in self.samples if k in s]), 3) for k in keys}


def one_pod(env: dict[str, str], aci: Path, kind: str, index: int, work: Path,
            on_detached=None) -> Outcome:
    """Run pod number `index` of `kind` and check its exit code (and output where it has one)."""
    if kind == "exit":
        code = index % 7
        r = kvmpod(env, "run", str(aci), *SH, f"exit {code}")
        return Outcome(kind, index, r.returncode == code, f"rc {r.returncode} != {code}: {r.stderr[-300:]!r}")
    if kind == "stdin":
        data = f"pod {index}\n".encode() * 100
        r = kvmpod(env, "run", "--interactive", str(aci), *SH, "cat", input=data)
        return Outcome(kind, index, r.returncode == 0 and r.stdout == data, f"rc {r.returncode}: {r.stderr[-300:]!r}")
    if kind == "volume":
        share = work / f"vol-{index}"
        share.mkdir(parents=True)
        try:
            r = kvmpod(env, "run", "--volume", f"v,kind=host,source={share}", str(aci),
                       "--mount", "volume=v,target=/v", *SH, f"echo {index} > /v/out")
            written = (share / "out").read_text() if (share / "out").exists() else ""
            return Outcome(kind, index, r.returncode == 0 and written == f"{index}\n",
                           f"rc {r.returncode}, wrote {written!r}: {r.stderr[-300:]!r}")
        finally:
            shutil.rmtree(share, ignore_errors=True)
    if kind == "user-net":
        r = kvmpod(env, "run", "--net", "user", str(aci), *SH, "ip -o -4 addr show | grep -q 10.0.2. && exit 3")
        return Outcome(kind, index, r.returncode == 3, f"rc {r.returncode}: {r.stderr[-300:]!r}")
    if kind == "detach":
        r = kvmpod(env, "run", "--detach", str(aci), *SH, "trap 'exit 7' TERM; while :; do sleep 1; done")
        if r.returncode != 0:
            return Outcome(kind, index, False, f"run --detach rc {r.returncode}: {r.stderr[-300:]!r}")
        uuid = r.stdout.decode().strip()
        if on_detached is not None:
            state = json.loads((Path(env["KVMPOD_RUN_DIR"]) / "pods" / uuid / "state.json").read_text())
            on_detached(state["kvmpod_pid"])
        time.sleep(0.5)   # the shell's trap is set once it runs its loop
        stop = kvmpod(env, "stop", uuid)
        status = kvmpod(env, "status", "--json", uuid)
        removed = kvmpod(env, "rm", uuid)
        try:
            apps = json.loads(status.stdout)["apps"]
            code = apps[0].get("exit_code")
        except (ValueError, KeyError, IndexError):
            code = None
        return Outcome(kind, index, stop.returncode == 0 and code == 7 and removed.returncode == 0,
                       f"stop rc {stop.returncode}, app exit {code}, rm rc {removed.returncode}: {stop.stderr[-300:]!r}")
    raise ValueError(kind)


def soak(env: dict[str, str], aci: Path, work: Path, sequential: int, waves: int, wave_size: int,
         sample_every: int = 10, progress=None) -> SoakResult:
    """`sequential` pods cycling through KINDS, then `waves` waves of `wave_size` concurrent ones."""
    result = SoakResult()
    started = time.monotonic()
    detached: list[dict[str, int]] = []

    def take_sample() -> None:
        sample: dict[str, float] = {"pods": result.pods, **machine_sample(env)}
        if detached:
            sample.update(detached[-1])
        result.samples.append(sample)

    def record(outcome: Outcome) -> None:
        result.pods += 1
        if not outcome.ok:
            result.wrong.append(outcome)

    kvmpod(env, "run", str(aci))   # the image imported, its disk built, the boot snapshot made: not sampled
    take_sample()
    for i in range(sequential):
        record(one_pod(env, aci, KINDS[i % len(KINDS)], i, work,
                       on_detached=lambda pid: detached.append(process_sample(pid))))
        if result.pods % sample_every == 0:
            take_sample()
            if progress:
                progress(result)
    for w in range(waves):
        with ThreadPoolExecutor(wave_size) as pool:
            base = sequential + w * wave_size
            futures = [pool.submit(one_pod, env, aci, KINDS[(base + j) % len(KINDS)], base + j, work)
                       for j in range(wave_size)]
            for f in futures:
                record(f.result())
        take_sample()
        if progress:
            progress(result)
    result.seconds = time.monotonic() - started
    return result


def measure_soak(aci: Path, work: Path, sequential: int = 500, waves: int = 5, wave_size: int = 16) -> dict:
    """The long soak, in a private store and runtime dir under `work`; then `kvmpod gc` and the leak check."""
    base = work / "soak"
    shutil.rmtree(base, ignore_errors=True)
    env = private_env(base)

    def progress(r: SoakResult) -> None:
        print(f"  soak: {r.pods} pods, {len(r.wrong)} wrong, {r.samples[-1]}", flush=True)

    result = soak(env, aci, base / "work", sequential, waves, wave_size, progress=progress)
    kvmpod(env, "gc")
    left = leftovers(env, base)
    sweep(lambda leaf: False, parent=parent_name(Path(env["KVMPOD_RUN_DIR"])))   # the runtime dir's cgroup parent
    shutil.rmtree(base, ignore_errors=True)
    return {"pods": result.pods, "sequential": sequential, "waves": waves, "wave_size": wave_size,
            "wrong": [f"{o.kind} #{o.index}: {o.detail}" for o in result.wrong], "seconds": round(result.seconds, 1),
            "slopes_per_100_pods": result.slopes(), "first": result.samples[0], "last": result.samples[-1],
            "left_after_gc": left}


def print_soak(r: dict) -> None:
    print(f"{r['pods']} pods ({r['sequential']} sequential, {r['waves']} waves of {r['wave_size']}) "
          f"in {r['seconds']:.0f} s; exit codes wrong: {len(r['wrong'])}")
    for line in r["wrong"][:10]:
        print(f"  wrong: {line}")
    for key, value in r["slopes_per_100_pods"].items():
        print(f"  {key:18} {r['first'].get(key, '-')!s:>12} -> {r['last'].get(key, '-')!s:>12}   "
              f"slope {value:+.3f} per 100 pods")
    print(f"  left after kvmpod gc: {r['left_after_gc'] or 'nothing'}")


if __name__ == "__main__":
    import argparse
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import build_busybox_aci

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--waves", type=int, default=5)
    parser.add_argument("--wave-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmpod-soak-") as tmp:
        print_soak(measure_soak(build_busybox_aci(Path(tmp)), Path(tmp), args.pods, args.waves, args.wave_size))
