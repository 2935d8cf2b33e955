"""QEMU's confinement (kvmpod/vm/sandbox.py, written out by kvmpod/vm/config.py): the options per QEMU
version, the probe of a QEMU without seccomp (a fake QEMU), kvmpod.toml's [security] switches, and the
kvmpod-qemu user's creation and its one-line error."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from kvmpod.errors import ConfigError, VMError
from kvmpod.vm import sandbox
from kvmpod.vm.backend import VMExit
from kvmpod.vm.config import Confinement, VMConfig, confinement_argv, qemu_argv

SANDBOX = ["-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"]
ROOT = Path("/run/kvmpod/qemu-root")


def confined(version: tuple[int, int], chroot: Path = ROOT) -> Confinement:
    return Confinement(seccomp=True, elevate_privileges="allow", user="kvmpod-qemu", chroot=chroot, version=version)


@pytest.mark.parametrize("version, expected", [
    ((7, 2), [*SANDBOX, "-chroot", str(ROOT), "-runas", "kvmpod-qemu"]),
    ((8, 2), [*SANDBOX, "-chroot", str(ROOT), "-runas", "kvmpod-qemu"]),
    ((9, 0), [*SANDBOX, "-runas", "kvmpod-qemu", "-run-with", f"chroot={ROOT}"]),   # -run-with has no user= yet
    ((9, 1), [*SANDBOX, "-run-with", f"chroot={ROOT},user=kvmpod-qemu"]),          # -runas deprecated
    ((10, 0), [*SANDBOX, "-run-with", f"chroot={ROOT},user=kvmpod-qemu"]),         # -runas and -chroot gone
])
def test_the_options_are_spelled_for_the_qemu_version(version, expected):
    assert confinement_argv(confined(version)) == expected


def test_a_comma_in_the_chroot_is_one_value_in_run_with():
    assert confinement_argv(confined((9, 1), Path("/run/a,b")))[-1] == "chroot=/run/a,,b,user=kvmpod-qemu"
    assert confinement_argv(confined((7, 2), Path("/run/a,b")))[3] == "/run/a,b"   # -chroot is no option list


def test_a_qemu_that_stays_root_denies_set_id_calls_and_no_confinement_writes_nothing():
    stays = Confinement(seccomp=True)
    assert confinement_argv(stays) == [
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert confinement_argv(Confinement()) == []


def test_qemu_argv_carries_the_confinement():
    cfg = VMConfig(name="p", kernel=Path("/k"), initrd=Path("/i"), cmdline="", console_log=Path("/c"),
                   confinement=confined((7, 2)))
    argv = qemu_argv(cfg)
    i = argv.index("-sandbox")
    assert argv[i:i + 6] == [*SANDBOX, "-chroot", str(ROOT), "-runas", "kvmpod-qemu"]


# --- the probe, with fake QEMUs ----------------------------------------------------------------------

def fake_qemu(tmp_path: Path, seccomp: bool, version: str = "7.2.22") -> Path:
    binary = tmp_path / "qemu-system-x86_64"
    refuse = ('case "$*" in *-sandbox*) echo "$0: -sandbox on: There is no option group \'sandbox\'" >&2; '
              'echo "$0: -sandbox on: -sandbox support is not enabled in this QEMU binary" >&2; exit 1;; esac\n')
    binary.write_text("#!/bin/sh\n" + ("" if seccomp else refuse)
                      + f'echo "$*" >> {tmp_path}/calls\necho "QEMU emulator version {version} (fake)"\n')
    binary.chmod(0o755)
    return binary


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPOD_CACHE_DIR", str(tmp_path / "cache"))
    sandbox.probe.cache_clear()
    yield tmp_path / "cache"
    sandbox.probe.cache_clear()


def test_the_probe_learns_version_and_seccomp_once_per_binary(tmp_path, cache):
    binary = fake_qemu(tmp_path, seccomp=True, version="9.1.0")
    assert sandbox.probe(binary) == sandbox.QemuCaps((9, 1), True)
    sandbox.probe.cache_clear()
    assert sandbox.probe(binary) == sandbox.QemuCaps((9, 1), True)   # from <cache>/qemu-caps.json
    assert (tmp_path / "calls").read_text().count("-version") == 1
    assert (cache / sandbox.CAPS_FILE).is_file()


def test_a_qemu_without_seccomp_gives_one_notice_and_the_pod_runs_unfiltered(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("KVMPOD_CONFIG", str(tmp_path / "none.toml"))
    binary = fake_qemu(tmp_path, seccomp=False)
    caps = sandbox.probe(binary)
    assert caps == sandbox.QemuCaps((7, 2), False, "-sandbox on: -sandbox support is not enabled in this QEMU binary")
    confinement, notices = sandbox.confinement(binary, is_root=False, shares_9p=False)
    assert confinement == Confinement(seccomp=False, version=(7, 2))
    assert notices == [f"QEMU {binary} has no seccomp support (-sandbox on: -sandbox support is not enabled in this "
                       "QEMU binary): its syscalls are not filtered (`kvmpod setup --only qemu` builds a QEMU that "
                       "has it)"]


def test_a_qemu_that_prints_no_version_is_a_one_line_error(tmp_path, cache):
    binary = tmp_path / "qemu"
    binary.write_text("#!/bin/sh\necho nonsense\n")
    binary.chmod(0o755)
    with pytest.raises(VMError, match=r"qemu: `-version` printed no QEMU version \(nonsense\)$"):
        sandbox.probe(binary)


# --- the decision and the switches ---------------------------------------------------------------------

@pytest.fixture
def settings(tmp_path, monkeypatch):
    conf = tmp_path / "kvmpod.toml"
    monkeypatch.setenv("KVMPOD_CONFIG", str(conf))

    def write(text: str) -> Path:
        conf.write_text(text)
        return conf
    write("")
    return write


def test_root_switches_user_and_chroots_and_other_users_only_filter(tmp_path, cache, settings, monkeypatch):
    binary = fake_qemu(tmp_path, seccomp=True)
    made = []
    monkeypatch.setattr(sandbox, "ensure_user", made.append)
    monkeypatch.setattr(sandbox, "chroot_dir", lambda: ROOT)
    assert sandbox.confinement(binary, is_root=True, shares_9p=False) == (confined((7, 2)), [])
    assert made == ["kvmpod-qemu"]
    assert sandbox.confinement(binary, is_root=False, shares_9p=False) == (Confinement(seccomp=True), [])


def test_a_9p_pod_keeps_a_root_qemu_with_one_notice(tmp_path, cache, settings):
    binary = fake_qemu(tmp_path, seccomp=True)
    confinement, notices = sandbox.confinement(binary, is_root=True, shares_9p=True)
    assert confinement == Confinement(seccomp=True)
    assert len(notices) == 1 and notices[0].startswith("QEMU runs as root, without a chroot: it serves the pod's "
                                                       "host volumes over virtio-9p")


def test_the_security_switches_turn_each_off_with_a_notice(tmp_path, cache, settings):
    binary = fake_qemu(tmp_path, seccomp=True)
    conf = settings('[security]\nsandbox = false\nqemu-user = false\n')
    confinement, notices = sandbox.confinement(binary, is_root=True, shares_9p=False)
    assert confinement == Confinement(seccomp=False)
    assert notices == [f"QEMU runs without its seccomp sandbox: [security] sandbox = false in {conf} (for measuring only)",
                       f"QEMU runs as root: [security] qemu-user = false in {conf} (for measuring only)"]
    settings('[security]\nqemu-user = "someone-else"\n')
    assert sandbox.user_setting() == ("someone-else", None)


@pytest.mark.parametrize("text, message", [
    ('[security]\nsandbox = "yes"\n', r"\[security\] sandbox in .*: 'yes' must be true or false"),
    ('[security]\nqemu-user = true\n', r"\[security\] qemu-user in .*: True must be a user name or false"),
    ('[security]\nqemu-user = "a,b"\n', r"\[security\] qemu-user in .*: 'a,b' must be a user name or false"),
])
def test_bad_security_settings_are_one_line_errors(tmp_path, cache, settings, text, message):
    settings(text)
    with pytest.raises(ConfigError, match=message):
        sandbox.confinement(fake_qemu(tmp_path, seccomp=True), is_root=True, shares_9p=False)


# --- the user --------------------------------------------------------------------------------------------

def test_the_user_is_a_system_user_without_home_or_shell():
    assert sandbox.useradd_argv("kvmpod-qemu") == [
        "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
        "--user-group", "--comment", "QEMU of kvmpod pods", "kvmpod-qemu"]


def test_a_user_that_cannot_be_created_is_one_line_naming_the_fix(monkeypatch):
    def no_user(name):
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", no_user)
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 1, "", "useradd: Permission denied.\nuseradd: cannot lock /etc/passwd; try again later.\n"))
    with pytest.raises(VMError) as e:
        sandbox.ensure_user("kvmpod-qemu")
    assert str(e.value) == (
        "cannot create the system user kvmpod-qemu that QEMU runs as (useradd: cannot lock /etc/passwd; try again "
        "later.): create it with `useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "
        "--user-group --comment 'QEMU of kvmpod pods' kvmpod-qemu`, or set [security] qemu-user = false in kvmpod.toml to "
        "run QEMU as root")
    assert "\n" not in str(e.value)


def test_a_missing_useradd_is_the_same_one_line_error(monkeypatch):
    monkeypatch.setattr(pwd, "getpwnam", lambda name: (_ for _ in ()).throw(KeyError(name)))

    def missing(argv, **kw):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(VMError, match=r"^cannot create the system user q that QEMU runs as \(useradd: No such file "
                                      r"or directory\): create it with `useradd"):
        sandbox.ensure_user("q")


def test_a_concurrent_useradd_that_won_the_race_is_fine(monkeypatch):
    entry = pwd.struct_passwd(("kvmpod-qemu", "x", 999, 995, "", "/nonexistent", "/usr/sbin/nologin"))
    answers = iter([KeyError("kvmpod-qemu"), entry])

    def getpwnam(name):
        answer = next(answers)
        if isinstance(answer, KeyError):
            raise answer
        return answer

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 9, "", "useradd: user 'kvmpod-qemu' already exists\n"))
    assert sandbox.ensure_user("kvmpod-qemu") == entry


def test_a_qemu_user_that_is_root_is_refused():
    with pytest.raises(VMError, match=r"^user root \(uid 0, gid 0\) is root: QEMU must switch to an unprivileged user"):
        sandbox.ensure_user("root")


@pytest.mark.skipif(os.geteuid() != 0, reason="the chroot directory is root's")
def test_the_chroot_is_root_owned_unwritable_and_holds_only_a_copy_of_resolv_conf(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPOD_RUN_DIR", str(tmp_path / "run"))
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.1\n")
    root = sandbox.chroot_dir(resolv)
    assert root == tmp_path / "run" / "qemu-root" and oct(root.stat().st_mode & 0o777) == "0o555"
    copy = root / "etc" / "resolv.conf"
    assert copy.read_text() == "nameserver 192.0.2.1\n" and oct(copy.stat().st_mode & 0o777) == "0o444"
    assert sorted(p.name for p in root.rglob("*")) == ["etc", "resolv.conf"]
    resolv.write_text("nameserver 192.0.2.2\n")       # the host's changed: the next pod's QEMU sees it
    assert sandbox.chroot_dir(resolv) == root and copy.read_text() == "nameserver 192.0.2.2\n"
    resolv.unlink()                                    # none on the host: an empty one
    assert sandbox.chroot_dir(resolv) == root and copy.read_text() == ""
    (root / "etc").chmod(0o755)
    (root / "etc" / "x").write_text("")
    with pytest.raises(VMError, match=r"qemu-root: QEMU's chroot must be a directory of root's that nobody can "
                                      r"write, holding nothing but etc/resolv.conf"):
        sandbox.chroot_dir(resolv)


def test_a_qemu_killed_by_its_filter_is_reported_as_that():
    assert VMExit(-31).describe() == ("QEMU was killed by its seccomp sandbox (SIGSYS): it made a system call the "
                                     "sandbox denies")


def test_setup_makes_the_user_as_root_only_and_not_when_switched_off(tmp_path, settings, monkeypatch):
    from kvmpod import provision

    made = []
    monkeypatch.setattr(sandbox, "ensure_user", lambda name: made.append(name) or pwd.struct_passwd(
        (name, "x", 999, 995, "", "/nonexistent", "/usr/sbin/nologin")))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert provision.qemu_user() == "kvmpod-qemu (uid 999, gid 995)" and made == ["kvmpod-qemu"]
    settings('[security]\nqemu-user = false\n')
    assert provision.qemu_user() is None
    settings('')
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert provision.qemu_user() is None and made == ["kvmpod-qemu"]


def test_a_read_only_volumes_virtiofsd_serves_a_read_only_bind_of_it():
    from kvmpod.vm.virtiofs import FsShare, virtiofsd_argv

    share = FsShare("v", Path("/srv/a b;$(x)"), Path("/p/s.sock"), read_only=True)
    argv = virtiofsd_argv(Path("/usr/lib/qemu/virtiofsd"), share)
    assert argv[:10] == ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                         'mount --bind -o ro -- "$1" "$1" && shift && exec "$@"', "kvmpod-ro-volume", "/srv/a b;$(x)"]
    assert argv[10:] == virtiofsd_argv(Path("/usr/lib/qemu/virtiofsd"), FsShare("v", share.source, share.socket))
    assert "modcaps=-mknod:-setfcap" in argv
