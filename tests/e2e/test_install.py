"""kvmpod installed like real software: the wheel in a fresh venv outside the checkout, `make install` (staged
under DESTDIR, and at its final path), `make uninstall`, `kvmpod setup` — pods run with each, as root and as
an unprivileged user this module creates (user-mode networking), exit codes exact."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, kvmpod_cmd

SYSTEM_PYTHON = "/usr/bin/python3"
INSTALL_TIMEOUT = 600


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("cwd", "/")
    kwargs.setdefault("timeout", INSTALL_TIMEOUT)
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def ok(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = run(cmd, **kwargs)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def public_dir():
    """A directory the test user can read too (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="kvmpod-install-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def image(public_dir, busybox_aci) -> Path:
    copy = public_dir / "busybox.aci"
    shutil.copyfile(busybox_aci, copy)
    copy.chmod(0o644)
    return copy


@pytest.fixture(scope="module")
def wheel(public_dir) -> Path:
    """The wheel as `python -m build` makes it: an sdist of the checkout, then the wheel from that sdist."""
    out = public_dir / "dist"
    ok([SYSTEM_PYTHON, "-m", "build", "--outdir", str(out), str(REPO)])
    (found,) = out.glob("kvmpod-*.whl")
    return found


@pytest.fixture(scope="module")
def user():
    """An unprivileged user with a home of its own, removed with everything it made."""
    name = f"kvmpodt{secrets.token_hex(3)}"
    ok(["useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name])
    entry = pwd.getpwnam(name)
    try:
        yield entry
    finally:
        left = run(["pgrep", "-u", str(entry.pw_uid)]).stdout.split()
        for pid in left:  # the test user's processes: a failed test may have left a pod
            os.kill(int(pid), 9)
        run(["userdel", "--remove", name])
        shutil.rmtree(f"/tmp/kvmpod-{entry.pw_uid}", ignore_errors=True)
        assert not left, f"processes of the test user were left: {left}"


def as_user(entry: pwd.struct_passwd, cmd: list[str]) -> subprocess.CompletedProcess:
    env = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name, "PATH": "/usr/bin:/bin",
           "LC_ALL": "C.UTF-8"}
    return run(cmd, user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], env=env, cwd=entry.pw_dir)


def user_pods_left(entry: pwd.struct_passwd) -> list[str]:
    pods = Path(f"/tmp/kvmpod-{entry.pw_uid}/pods")
    return sorted(os.listdir(pods)) if pods.exists() else []


POD = ["--exec", "/bin/sh", "--", "-c", "echo hello from the pod; exit {code}"]


def pod_args(image: Path, code: int, net: str) -> list[str]:
    return ["run", "--net", net, str(image), *[w.format(code=code) for w in POD]]


def test_wheel_carries_what_kvmpod_needs(wheel):
    assert wheel.name == "kvmpod-0.1.0-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel) as z:
        entries = {i.filename: i for i in z.infolist()}
    for name in ("kvmpod-agent", "kvmpod-relay"):
        info = entries[f"kvmpod/libexec/{name}"]
        assert stat.S_IMODE(info.external_attr >> 16) == 0o755 and info.file_size > 10_000
    for data in ("kvmpod/agent/protocol.toml", "kvmpod/boot/data/guest-modules.txt", "kvmpod/boot/data/minimal.config",
                 "kvmpod/image/schema/image-manifest.schema.json", "kvmpod/pod/schema/pod-manifest.schema.json"):
        assert data in entries
    assert any(n.startswith("kvmpod/boot/data/patches/") and n.endswith(".patch") for n in entries)
    assert any(n.startswith("kvmpod/vm/data/qemu-patches/") and n.endswith(".patch") for n in entries)


def test_wheel_build_without_a_compiler_fails_in_one_line(tmp_path):
    """No wheel without its agent: a build where only `make` is on PATH stops, naming the packages."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").symlink_to(shutil.which("make"))
    out = tmp_path / "dist"
    proc = run([SYSTEM_PYTHON, "-m", "build", "--outdir", str(out), str(REPO)],
               env={**os.environ, "PATH": str(bin_dir)})
    assert proc.returncode != 0
    assert ("kvmpod: building the wheel compiles the guest agent and kvmpod-relay (static C): no C compiler "
            "(apt-get install gcc musl-tools)") in proc.stdout + proc.stderr
    assert list(out.glob("*.whl")) == []


@pytest.fixture(scope="module")
def venv(wheel, public_dir) -> Path:
    """The wheel installed into a fresh venv of the system Python, outside the checkout."""
    path = public_dir / "venv"
    ok([SYSTEM_PYTHON, "-m", "venv", str(path)])
    ok([str(path / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)])
    return path


def test_wheel_in_a_fresh_venv_runs_pods_as_root_and_as_a_user(venv, image, user, kvmpod_env):
    site = ok([str(venv / "bin" / "python"), "-c",
               "from kvmpod import resources; from kvmpod.boot.initrd import find_agent; "
               "from kvmpod.pod.relay import find_relay; print(resources.checkout(), find_agent(), find_relay())"])
    libexec = next(venv.glob("lib/python3*/site-packages/kvmpod/libexec"))
    assert site.stdout.split() == ["None", str(libexec / "kvmpod-agent"), str(libexec / "kvmpod-relay")]

    # root, from /, with the checkout hidden: nothing may come from the source tree
    hidden = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f"mount -t tmpfs tmpfs {REPO} && exec \"$@\"", "sh"]
    proc = run([*hidden, str(venv / "bin" / "kvmpod"), *pod_args(image, 6, "none")], env=kvmpod_env)
    assert (proc.returncode, proc.stdout) == (6, "hello from the pod\n"), proc.stderr

    proc = as_user(user, [str(venv / "bin" / "kvmpod"), *pod_args(image, 7, "user")])
    assert (proc.returncode, proc.stdout) == (7, "hello from the pod\n"), proc.stderr
    assert user_pods_left(user) == []
    store = Path(user.pw_dir, ".local", "share", "kvmpod")   # the user's own store, not root's
    assert store.stat().st_uid == user.pw_uid

    # the user's setup finds root's builds in the system cache and builds nothing of its own
    proc = as_user(user, [str(venv / "bin" / "kvmpod"), "setup"])
    assert proc.returncode == 0, proc.stderr
    assert "builds in /var/cache/kvmpod count too" in proc.stdout
    assert proc.stdout.count("      up to date: /var/cache/kvmpod/") == 3, proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("kvmpod setup: everything was up to date")
    own = Path(user.pw_dir, ".cache", "kvmpod")
    assert not (own / "kernels").exists() and not (own / "qemu").exists() and not (own / "build").exists()


def test_a_users_setup_builds_into_its_own_cache(venv, user):
    """Not root, a cache of its own named: the Debian cloud kernel is fetched there, once."""
    cache = Path(user.pw_dir, "own-cache")
    setup = ["env", f"KVMPOD_CACHE_DIR={cache}", str(venv / "bin" / "kvmpod"), "setup", "--only", "distro-kernel"]
    first = as_user(user, setup)
    assert first.returncode == 0 and "      built: " in first.stdout, first.stdout + first.stderr
    (kernel,) = (cache / "kernels").glob("debian-cloud-*")
    assert kernel.stat().st_uid == user.pw_uid
    second = as_user(user, setup)
    assert second.returncode == 0 and f"      up to date: {kernel} (" in second.stdout, second.stdout


def test_setup_twice_builds_once(tmp_path, kvmpod_env):
    """A fresh cache: the first `kvmpod setup` fetches the Debian cloud kernel, the second does nothing."""
    env = {**kvmpod_env, "KVMPOD_CACHE_DIR": str(tmp_path / "cache")}
    first = ok(kvmpod_cmd("setup", "--only", "distro-kernel"), env=env)
    assert "      built: " in first.stdout and first.stdout.rstrip().endswith(")"), first.stdout
    (kernel,) = (tmp_path / "cache" / "kernels").glob("debian-cloud-*")
    before = {p: p.stat().st_mtime_ns for p in kernel.rglob("*")}
    inode = kernel.stat().st_ino
    second = ok(kvmpod_cmd("setup", "--only", "distro-kernel"), env=env)
    assert f"      up to date: {kernel} (" in second.stdout, second.stdout
    assert "downloading" not in second.stdout and "kvmpod setup: everything was up to date" in second.stdout
    assert kernel.stat().st_ino == inode and {p: p.stat().st_mtime_ns for p in kernel.rglob("*")} == before
    log = tmp_path / "cache" / "logs" / "setup-distro-kernel.log"
    assert f"log {log})" in second.stdout and "downloading" in log.read_text()  # the first run's messages kept


EXPECTED_TREE = {  # everything `make install PREFIX=/usr` puts outside the venv, relative to PREFIX
    "bin/kvmpod", "lib/kvmpod/kvmpod-agent", "lib/kvmpod/kvmpod-relay", "lib/kvmpod/installed-files",
    "share/man/man1/kvmpod.1", "share/bash-completion/completions/kvmpod", "share/zsh/vendor-completions/_kvmpod",
    "share/doc/kvmpod/README.md", "share/doc/kvmpod/examples/kvmpod.toml",
}


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if (p.is_file() or p.is_symlink()) and "lib/kvmpod/venv" not in str(p.relative_to(root))}


def test_make_install_destdir_then_uninstall(public_dir, image, kvmpod_env, tmp_path):
    destdir = public_dir / "destdir"
    ok(["make", "-s", "install", f"DESTDIR={destdir}", "PREFIX=/usr"], cwd=REPO)
    usr = destdir / "usr"
    tree = files_under(usr)
    docs = {f"share/doc/kvmpod/{d.name}" for d in (REPO / "docs").glob("*.md")}
    scripts = set(ok([str(usr / "lib/kvmpod/venv/bin/python"), "-c",
                      "from importlib.metadata import distribution as d; "
                      "print(' '.join(e.name for e in d('kvmpod').entry_points if e.group == 'console_scripts'))"]
                     ).stdout.split())
    # every console script (kvmpod, and those pyproject.toml adds) is linked and has its man page
    assert "kvmpod" in scripts
    per_script = {f"bin/{s}" for s in scripts} | {f"share/man/man1/{s}.1" for s in scripts}
    assert tree == EXPECTED_TREE | docs | per_script, sorted(tree)
    assert os.readlink(usr / "bin" / "kvmpod") == "../lib/kvmpod/venv/bin/kvmpod"
    assert (usr / "lib/kvmpod/venv/bin/kvmpod").read_text().startswith("#!/usr/lib/kvmpod/venv/bin/python\n")
    # relocated: no file of the staged tree names the staging directory (shebangs, pyvenv.cfg, .pyc...)
    assert run(["grep", "-rlF", str(destdir), str(destdir)]).stdout == ""
    assert ".SS kvmpod run" in (usr / "share/man/man1/kvmpod.1").read_text()

    # the staged tree as it will be: layered over /usr in a mount namespace of its own
    over_usr = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount -t overlay overlay -o lowerdir={usr}:/usr /usr && exec \"$@\"", "sh"]
    proc = run([*over_usr, "/usr/bin/kvmpod", *pod_args(image, 5, "none")], env=kvmpod_env, cwd=str(tmp_path))
    assert (proc.returncode, proc.stdout) == (5, "hello from the pod\n"), proc.stderr
    completion = run(["bash", "--norc", "--noprofile", "-i"], input=(
        f"source {usr}/share/bash-completion/completions/kvmpod\n"
        "COMP_WORDS=(kvmpod ru); COMP_CWORD=1; _kvmpod; echo \"${COMPREPLY[*]}\"\n"))
    assert completion.stdout.strip() == "run"

    ok(["make", "-s", "uninstall", f"DESTDIR={destdir}", "PREFIX=/usr"], cwd=REPO)
    assert sorted(p.relative_to(destdir) for p in destdir.rglob("*")) == [Path("usr")]


def test_make_install_prefix_runs_pods_as_root_and_as_a_user(public_dir, image, user, kvmpod_env):
    prefix = public_dir / "prefix"
    # root's umask does not leak into the install: the user below can run it
    ok(["sh", "-c", f"umask 077 && exec make -s install PREFIX={prefix}"], cwd=REPO)
    kvmpod = prefix / "bin" / "kvmpod"
    assert (prefix / "lib/kvmpod/venv/bin/kvmpod").read_text().startswith(f"#!{prefix}/lib/kvmpod/venv/bin/python\n")
    assert (prefix / "share/zsh/site-functions/_kvmpod").is_file()   # not Debian's vendor dir outside /usr
    proc = run([str(kvmpod), *pod_args(image, 4, "none")], env=kvmpod_env)
    assert (proc.returncode, proc.stdout) == (4, "hello from the pod\n"), proc.stderr
    proc = as_user(user, [str(kvmpod), *pod_args(image, 3, "user")])
    assert (proc.returncode, proc.stdout) == (3, "hello from the pod\n"), proc.stderr
    assert user_pods_left(user) == []

    ok(["make", "-s", "uninstall", f"PREFIX={prefix}"], cwd=REPO)
    assert list(prefix.iterdir()) == []
    proc = run(["make", "-s", "uninstall", f"PREFIX={prefix}"], cwd=REPO)
    assert proc.returncode != 0 and f"no kvmpod installed in {prefix}" in proc.stderr
