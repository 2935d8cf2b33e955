"""`kvmpod setup`: what is built per machine, into the cache — the minimal guest kernel (from Debian's
linux-source), the Debian cloud kernel (the fallback), kvmpod's own QEMU (from Debian's qemu source).

Each step first checks its Debian build dependencies (one dpkg-query: a missing one is a one-line error
naming it), then whether an identical build is already in a cache — the user's, and for users other than
root the system one (/var/cache/kvmpod, where root's setup puts it) when readable, as pods find it there
too — and builds only when none is. So a second run builds nothing. Every step prints what it did, its
time and its log file; on a terminal a status line shows the build's progress meanwhile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from kvmpod import paths, resources
from kvmpod.boot import distro, kcache, minimal
from kvmpod.boot.modules import guest_module_names
from kvmpod.errors import KernelError, KvmpodError, QemuBuildError
from kvmpod.vm import qemu_binary, qemu_build, sandbox

SYSTEM_CACHE = Path("/var/cache/kvmpod")
LOG_DIR = "logs"     # <cache>/logs/setup-<step>.log: each step's messages


@dataclass(frozen=True)
class StepResult:
    step: str
    path: Path              # what the step provides (a kernel dir, a QEMU build dir)
    built: bool             # False: an identical build was there already
    seconds: float
    log: Path               # the step's log (its messages); build logs are named in it


@dataclass(frozen=True)
class Step:
    name: str               # for --only
    title: str
    packages: tuple[str, ...]          # Debian packages the step needs
    error: type[KvmpodError]
    estimate: str           # how long a first build takes here, for the header line
    run: Callable[["StepContext"], tuple[Path, bool]]


@dataclass
class StepContext:
    cache: Path             # where this user's builds go
    reuse: list[Path]       # other caches whose identical builds count (the system cache)
    force: bool
    jobs: int | None
    log: Callable[[str], None]


def own_cache() -> Path:
    return paths.cache_dir()


def reusable_caches() -> list[Path]:
    """Caches besides the user's whose builds this user's pods use too (kvmpod/boot/kernel.py and
    kvmpod/vm/qemu_binary.py search them): the system cache, for users other than root, unless
    KVMPOD_CACHE_DIR names one cache for everything."""
    if "KVMPOD_CACHE_DIR" in os.environ or own_cache() == SYSTEM_CACHE:
        return []
    return [SYSTEM_CACHE] if os.access(SYSTEM_CACHE, os.R_OK | os.X_OK) else []


def missing_packages(packages: tuple[str, ...]) -> list[str]:
    """The packages of `packages` that dpkg does not have installed."""
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Package}\t${db:Status-Status}\n", *packages],
                              capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
    except FileNotFoundError as e:
        raise KvmpodError("dpkg-query not found: kvmpod setup builds from Debian packages (a Debian host)") from e
    installed = {name.split(":")[0] for name, _, status in (line.partition("\t") for line in proc.stdout.splitlines())
                 if status == "installed"}
    return [p for p in packages if p not in installed]


def check_packages(step: Step) -> None:
    if missing := missing_packages(step.packages):
        plural = "s" if len(missing) > 1 else ""
        raise step.error(f"{step.title} needs the Debian package{plural} {', '.join(missing)}: "
                         f"apt-get install {' '.join(missing)}")


# --- the steps -------------------------------------------------------------------------------------

def _minimal_kernel(ctx: StepContext) -> tuple[Path, bool]:
    digest = minimal.current_digest()
    if not ctx.force:
        for cache in (ctx.cache, *ctx.reuse):
            if (done := minimal.installed_kernel(kcache.kernels_dir(cache), digest)) is not None:
                return done, False
    return minimal.build(ctx.cache, force=ctx.force, jobs=ctx.jobs, log=ctx.log), True


def _distro_kernel(ctx: StepContext) -> tuple[Path, bool]:
    try:
        package, version = distro.resolve_package()
    except KernelError:  # stale or missing package lists: fetch() refreshes them (as root) and says why
        return distro.fetch(ctx.cache, force=ctx.force, log=ctx.log), True
    names = guest_module_names()
    if not ctx.force:
        for cache in (ctx.cache, *ctx.reuse):
            kdir = kcache.kernels_dir(cache) / distro.dir_name(package.removeprefix("linux-image-"))
            if distro.is_up_to_date(kdir, package, version, names):
                return kdir, False
    return distro.fetch(ctx.cache, force=ctx.force, log=ctx.log), True


def _qemu(ctx: StepContext) -> tuple[Path, bool]:
    digest = qemu_build.build_hash(qemu_build.source_version())
    if not ctx.force:
        for cache in ctx.reuse:  # another user's build counts only if pods would run it (qemu_binary.py)
            done = qemu_build.installed_build(qemu_binary.qemu_dir(cache), digest)
            if done and ((qemu_binary.read_build_meta(done) or {}).get("debian_binary")
                         == qemu_binary.binary_identity(qemu_binary.DEBIAN_QEMU)):
                return done, False
        if qemu_build.installed_build(qemu_binary.qemu_dir(ctx.cache), digest) is not None:
            # build() finds it, and refreshes what it recorded of Debian's binary if need be
            return qemu_build.build(ctx.cache, log=lambda _: None), False
    built = qemu_build.build(ctx.cache, force=ctx.force, jobs=ctx.jobs, log=ctx.log)
    ctx.log(f"make's output: {built / qemu_build.BUILD_LOG}")
    return built, True


def steps() -> list[Step]:
    return [
        Step("minimal-kernel", "kvmpod's minimal guest kernel", minimal.BUILD_PACKAGES, KernelError,
             "~5 min on 2 cores", _minimal_kernel),
        Step("distro-kernel", "the Debian cloud kernel (the fallback guest kernel)", ("apt", "dpkg", "kmod"),
             KernelError, "a download", _distro_kernel),
        Step("qemu", "kvmpod's QEMU", (qemu_build.BINARY_PACKAGE, *qemu_build.BUILD_PACKAGES), QemuBuildError,
             "~2 min on 2 cores", _qemu),
    ]


STEP_NAMES = ("minimal-kernel", "distro-kernel", "qemu")
KERNEL_STEPS = ("minimal-kernel", "distro-kernel")


# --- running them ----------------------------------------------------------------------------------

def _newest_build_log(cache: Path, since: float) -> Path | None:
    """The build log being written now (make's, under <cache>/build), if any."""
    newest = None
    for log in (cache / "build").glob("*/**/build.log"):
        try:
            mtime = log.stat().st_mtime
        except OSError:
            continue
        if mtime >= since and (newest is None or mtime > newest[0]):
            newest = (mtime, log)
    return newest[1] if newest else None


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 512))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return lines[-1].strip()[:70] if lines else ""


@contextmanager
def _status(title: str, cache: Path, out: TextIO) -> Iterator[None]:
    """On a terminal: a status line with the elapsed time and the build log's last line (rich, lazily)."""
    if not out.isatty():
        yield
        return
    from rich.console import Console

    started, done = time.monotonic(), threading.Event()
    console = Console(file=out)
    with console.status(title) as status:
        def tick() -> None:
            while not done.wait(1.0):
                log = _newest_build_log(cache, time.time() - 5)
                tail = f": {_last_line(log)}" if log else ""
                status.update(f"{title} ({time.monotonic() - started:.0f} s){tail}")

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


def run_steps(names: list[str], force: bool = False, jobs: int | None = None,
              out: TextIO | None = None) -> list[StepResult]:
    """Run the named steps in order; print each one's header, messages, outcome, time and log (to
    `out`, default stdout)."""
    out = out or sys.stdout
    cache = own_cache()
    ctx_reuse = reusable_caches()
    chosen = [s for s in steps() if s.name in names]
    results = []
    for number, step in enumerate(chosen, 1):
        print(f"[{number}/{len(chosen)}] {step.title}", file=out, flush=True)
        check_packages(step)
        log_path = cache / LOG_DIR / f"setup-{step.name}.log"
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "a")  # appended: an up-to-date run keeps the build's messages
        except OSError as e:
            raise step.error(f"cannot write the setup log {log_path}: {e.strerror}") from e
        with log_file:
            def log(message: str, show: bool = True) -> None:
                if show:
                    print(f"      {message}", file=out, flush=True)
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=log_file, flush=True)

            log(f"kvmpod setup: {step.title}, cache {cache}", show=False)

            started = time.monotonic()
            with _status(f"{step.title}: checking, building if need be ({step.estimate} the first time)",
                         cache, out):
                path, built = step.run(StepContext(cache, ctx_reuse, force, jobs, log))
            seconds = time.monotonic() - started
            log(f"{'built' if built else 'up to date'}: {path} ({seconds:.1f} s)", show=False)
        print(f"      {'built' if built else 'up to date'}: {path} ({seconds:.1f} s; log {log_path})",
              file=out, flush=True)
        results.append(StepResult(step.name, path, built, seconds, log_path))
    return results


def qemu_user() -> str | None:
    """As root: the system user pods' QEMU switches to (kvmpod/vm/sandbox.py), made now if it is not
    there, so that no pod has to make it; None for other users (their QEMU is theirs) or when
    kvmpod.toml's [security] qemu-user = false."""
    name, _ = sandbox.user_setting()
    if os.geteuid() != 0 or name is None:
        return None
    entry = sandbox.ensure_user(name)
    return f"{name} (uid {entry.pw_uid}, gid {entry.pw_gid})"


def check_programs() -> list[tuple[str, Path]]:
    """The agent and relay this kvmpod runs (they come with the package, or a checkout's `make agent`)."""
    found = []
    for name in resources.PROGRAMS:
        path = resources.find_program(name)
        if path is None:
            raise KernelError(f"{name} not found: {resources.missing_program_hint(name)}")
        found.append((name, path))
    return found
