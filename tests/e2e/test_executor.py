"""The appc executor rules, seen from inside the guest (docs/executor.md). Real VMs.

One pod of seven apps does most of the work: every app runs the same report script, which prints
what the app sees as `APP: what value` lines (environment, ids, /dev, mounts, /etc/hosts,
capabilities, no_new_privs, seccomp, writes), and the test compares them with what the executor
rules say. The images are written here with tarfile: busybox plus the scripts, a file owned by
1234:5678 for the "/path" user and group forms, and (one image) an /etc/hosts of its own.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

from tests.e2e.conftest import the_error

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CAPS = "00000000a80425fb"  # spec/ace.md's 14 default capabilities
OWNED = (1234, 5678)              # owner and group of /check/owned

REPORT = r"""#!/bin/sh
# What the app sees, one "APP: what value" line each.
say() { echo "$AC_APP_NAME: $*"; }
tr '\0' '\n' < /proc/$$/environ | while IFS= read -r line; do say "env $line"; done
say "args $*"
say "id $(id)"
say "pwd $(pwd)"
say "pre-start-marker $(cat /tmp/pre-start.marker 2>/dev/null || echo absent)"
for n in null zero full random urandom tty console; do say "dev $(stat -c '%n %F %t:%T %a' /dev/$n)"; done
say "ptmx $(readlink /dev/ptmx)"
while read -r _ mnt type opts _; do say "mount $mnt $type ${opts%%,*}"; done < /proc/mounts
say "hosts $(tr '\n' '|' < /etc/hosts)"
say "hosts-stat $(stat -c '%a %u %g' /etc/hosts)"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/$$/status |
    while read -r k v; do say "status ${k%:} $v"; done
say "mkdir $(mkdir /tmp/made 2>&1 && echo ok)"
say "write $( (echo x > /tmp/written) 2>&1 && echo ok)"
touch /tmp/main.done 2>/dev/null
say "end"
[ -z "$KILL_SELF" ] || kill -"$KILL_SELF" $$
exit "${EXIT_CODE:-0}"
"""

# Event handlers: what they see, and (marker files) what ran before them.
PRE_START = r"""#!/bin/sh
say() { echo "$AC_APP_NAME/pre-start: $*"; }
tr '\0' '\n' < /proc/$$/environ | while IFS= read -r line; do say "env $line"; done
say "args $*"
say "id $(id)"
say "pwd $(pwd)"
say "main-done $([ -e /tmp/main.done ] && echo present || echo absent)"
echo "written by pre-start" > /tmp/pre-start.marker
echo "$AC_APP_NAME/pre-start: on stderr" >&2
"""

POST_STOP = r"""#!/bin/sh
say() { echo "$AC_APP_NAME/post-stop: $*"; }
tr '\0' '\n' < /proc/$$/environ | while IFS= read -r line; do say "env $line"; done
say "args $*"
say "id $(id)"
say "pwd $(pwd)"
say "main-done $([ -e /tmp/main.done ] && echo present || echo absent)"
exit 3
"""

FAIL = """#!/bin/sh
echo "pre-start: failing"
exit 3
"""

ISO = {
    "caps-retain": lambda *caps: {"name": "os/linux/capabilities-retain-set", "value": {"set": list(caps)}},
    "seccomp-remove": lambda errno_name, *calls: {"name": "os/linux/seccomp-remove-set",
                                                  "value": {"set": list(calls), "errno": errno_name}},
    "seccomp-retain": lambda *calls: {"name": "os/linux/seccomp-retain-set", "value": {"set": list(calls)}},
}


def _entry(name: str, data: bytes | None = None, mode: int = 0o755, owner: tuple[int, int] = (0, 0)):
    info = tarfile.TarInfo(f"rootfs/{name}")
    info.mode, (info.uid, info.gid), info.mtime = mode, owner, 1_700_000_000
    if data is None:
        info.type = tarfile.DIRTYPE
    else:
        info.size = len(data)
    return info, (io.BytesIO(data) if data is not None else None)


def write_aci(out: Path, rootfs: Path, name: str, app: dict, hosts: bytes | None = None) -> Path:
    """An ACI of the busybox rootfs (never with its own /etc/hosts) plus /check and maybe /etc/hosts."""
    manifest = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": name,
                "labels": [{"name": "os", "value": "linux"}, {"name": "arch", "value": "amd64"}], "app": app}
    data = json.dumps(manifest).encode()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(rootfs, arcname="rootfs", filter=lambda i: None if i.name == "rootfs/etc/hosts" else i)
        extra = [_entry("check"), _entry("check/report.sh", REPORT.encode()),
                 _entry("check/pre-start.sh", PRE_START.encode()), _entry("check/post-stop.sh", POST_STOP.encode()),
                 _entry("check/fail.sh", FAIL.encode()), _entry("check/owned", b"", 0o600, OWNED)]
        if hosts is not None:
            extra.append(_entry("etc/hosts", hosts, 0o644))
        for info, body in extra:
            tar.addfile(info, body)
    return out


def app(**extra) -> dict:
    return {"exec": ["/check/report.sh", "first arg", "second"], "user": "0", "group": "0", **extra}


@pytest.fixture(scope="module")
def images(busybox_rootfs, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("executor")
    main_app = app(
        user="app", group="extra", workingDirectory="/home/app", supplementaryGIDs=[3000, 65534],
        environment=[{"name": "IMAGE_VAR", "value": "from-image"}, {"name": "SPACED", "value": "a b  c"},
                     {"name": "EXIT_CODE", "value": "7"}],
        eventHandlers=[{"name": "pre-start", "exec": ["/check/pre-start.sh", "pre arg"]},
                       {"name": "post-stop", "exec": ["/check/post-stop.sh"]}],
        isolators=[ISO["caps-retain"]("CAP_NET_BIND_SERVICE", "CAP_KILL"),
                   {"name": "os/linux/no-new-privileges", "value": True},
                   ISO["seccomp-remove"]("ENOTSUP", "mkdir", "mkdirat"),
                   {"name": "os/linux/oom-score-adj", "value": 100},
                   {"name": "example.com/custom", "value": {"any": "thing"}}])
    return {
        "main": write_aci(d / "main.aci", busybox_rootfs, "example.com/executor-main", main_app),
        "hosts": write_aci(d / "hosts.aci", busybox_rootfs, "example.com/executor-hosts", app(),
                           hosts=b"10.1.2.3 custom-host\n"),
        "plain": write_aci(d / "plain.aci", busybox_rootfs, "example.com/executor-plain", app()),
        "capsroot": write_aci(d / "capsroot.aci", busybox_rootfs, "example.com/executor-capsroot", app(
            isolators=[ISO["caps-retain"]("CAP_NET_ADMIN", "CAP_CHOWN"), ISO["seccomp-retain"]("@appc.io/all")])),
        "killed": write_aci(d / "killed.aci", busybox_rootfs, "example.com/executor-killed", app(
            environment=[{"name": "KILL_SELF", "value": "KILL"}],
            eventHandlers=[{"name": "post-stop", "exec": ["/check/post-stop.sh"]}])),
        "sigsys": write_aci(d / "sigsys.aci", busybox_rootfs, "example.com/executor-sigsys", app(
            isolators=[ISO["seccomp-retain"]("write")])),
        "prefail": write_aci(d / "prefail.aci", busybox_rootfs, "example.com/executor-prefail", app(
            eventHandlers=[{"name": "pre-start", "exec": ["/check/fail.sh"]}])),
        "badcall": write_aci(d / "badcall.aci", busybox_rootfs, "example.com/executor-badcall", app(
            isolators=[ISO["seccomp-remove"]("", "mkdir", "no_such_call")])),
        "dockerset": write_aci(d / "dockerset.aci", busybox_rootfs, "example.com/executor-dockerset", app(
            isolators=[ISO["seccomp-remove"]("", "@docker/default-blacklist")])),
    }


def reports(stdout: bytes) -> dict[str, list[tuple[str, str]]]:
    """`APP: what value` lines by APP, in order."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in stdout.decode().splitlines():
        who, _, rest = line.partition(": ")
        what, _, value = rest.partition(" ")
        out[who].append((what, value))
    return out


def values(report: list[tuple[str, str]], what: str) -> list[str]:
    return [v for w, v in report if w == what]


def one(report: list[tuple[str, str]], what: str) -> str:
    (value,) = values(report, what)
    return value


@pytest.fixture(scope="module")
def pod(images, kvmpod_dirs):
    """The seven-app pod, run once for all the checks below."""
    import subprocess

    from tests.conftest import kvmpod_cmd
    from tests.e2e.conftest import VM_TIMEOUT

    args = ["run", "--debug", "--set-env", "POD_VAR=pod",
            str(images["main"]), "--name", "main",
            "---", str(images["hosts"]), "--name", "hosts", "--readonly-rootfs",
            "---", str(images["plain"]), "--name", "ro", "--readonly-rootfs", "--user", "/check/owned",
            "--group", "/check/owned",
            "---", str(images["plain"]), "--name", "num", "--user", "4321", "--group", "8765",
            "---", str(images["capsroot"]), "--name", "capsroot",
            "---", str(images["killed"]), "--name", "killed",
            "---", str(images["sigsys"]), "--name", "sigsys"]
    result = subprocess.run(kvmpod_cmd(*args), capture_output=True, env={**os.environ, **kvmpod_dirs},
                            timeout=VM_TIMEOUT)
    return result, reports(result.stdout)


METADATA_URL = re.compile(r"AC_METADATA_URL=http://127\.0\.0\.1:18112/[A-Za-z0-9_-]{43}")  # per pod


def expected_env(name: str, *image_env: str) -> list[str]:
    return [f"PATH={DEFAULT_PATH}", f"AC_APP_NAME={name}", "AC_METADATA_URL=<url>", "container=kvmpod", *image_env,
            "POD_VAR=pod"]


def env_of(report: list[tuple[str, str]]) -> list[str]:
    """The reported environment with the pod's random AC_METADATA_URL checked and shown as <url>."""
    return ["AC_METADATA_URL=<url>" if METADATA_URL.fullmatch(e) else e for e in values(report, "env")]


MAIN_ENV = expected_env("main", "IMAGE_VAR=from-image", "SPACED=a b  c", "EXIT_CODE=7")


def test_pod_exit_status_is_the_first_failing_apps_own(pod):
    result, _ = pod
    # main exits 7 (its failing post-stop does not change that); killed is killed by SIGKILL after
    # its report, sigsys by SIGSYS at its first syscall
    assert result.returncode == 7, result.stderr.decode()[-3000:]
    err = result.stderr.decode()
    assert "app main exited with code 7" in err
    assert "app killed killed by signal 9" in err and "app sigsys killed by signal 31" in err


def test_environment_is_exact_for_the_app_and_its_handlers(pod):
    _, r = pod
    assert env_of(r["main"]) == MAIN_ENV
    assert env_of(r["main/pre-start"]) == MAIN_ENV
    assert env_of(r["main/post-stop"]) == MAIN_ENV
    assert env_of(r["num"]) == expected_env("num")
    urls = {e for who in ("main", "main/pre-start", "num") for e in values(r[who], "env") if METADATA_URL.fullmatch(e)}
    assert len(urls) == 1  # one service per pod
    assert one(r["main"], "args") == "first arg second"
    assert one(r["main/pre-start"], "args") == "pre arg"
    assert one(r["main/post-stop"], "args") == ""


def test_handlers_run_in_order_as_the_app_with_its_user_and_directory(pod):
    result, r = pod
    order = ["main/pre-start", "main", "main/post-stop"]
    lines = [line.split(":")[0] for line in result.stdout.decode().splitlines() if line.split(":")[0] in order]
    # the three share the app's stdout, strictly one after the other
    assert lines == sorted(lines, key=order.index) and set(lines) == set(order)
    assert one(r["main/pre-start"], "main-done") == "absent"
    assert one(r["main"], "pre-start-marker") == "written by pre-start"
    assert one(r["main/post-stop"], "main-done") == "present"
    for who in order:
        assert one(r[who], "id") == "uid=1000(app) gid=2000(extra) groups=3000,65534(nogroup)", who
        assert one(r[who], "pwd") == "/home/app", who
    assert b"main/pre-start: on stderr\n" in result.stderr
    err = result.stderr.decode()
    assert "app main: post-stop handler /check/post-stop.sh exited with code 3 (the app's exit status stands)" in err


def test_post_stop_runs_after_a_killed_app(pod):
    result, r = pod
    assert values(r["killed"], "end") == [""]
    assert one(r["killed/post-stop"], "main-done") == "present"
    assert one(r["killed/post-stop"], "id") == "uid=0(root) gid=0(root)"
    who = [line.split(":")[0] for line in result.stdout.decode().splitlines() if line.startswith("killed")]
    first_post_stop = who.index("killed/post-stop")
    assert set(who[:first_post_stop]) == {"killed"} and set(who[first_post_stop:]) == {"killed/post-stop"}


def test_users_and_groups_by_name_number_and_path(pod):
    _, r = pod
    assert one(r["main"], "id").startswith("uid=1000(app) gid=2000(extra)")  # names from the image's files
    assert one(r["num"], "id") == "uid=4321 gid=8765"                        # numbers
    assert one(r["ro"], "id") == f"uid={OWNED[0]} gid={OWNED[1]}"            # owner and group of /check/owned
    assert one(r["hosts"], "id") == "uid=0(root) gid=0(root)"


def test_dev_proc_sys_are_there(pod):
    _, r = pod
    for who in ("main", "ro", "hosts"):
        devs = values(r[who], "dev")
        assert devs == [f"/dev/{n} character special file {mm} {mode}" for n, mm, mode in [
            ("null", "1:3", 666), ("zero", "1:5", 666), ("full", "1:7", 666), ("random", "1:8", 666),
            ("urandom", "1:9", 666), ("tty", "5:0", 666), ("console", "5:1", 600)]], who
        assert one(r[who], "ptmx") == "pts/ptmx"
        mounts = {m.rsplit(" ", 1)[0] for m in values(r[who], "mount")}
        assert {"/proc proc", "/sys sysfs", "/dev tmpfs", "/dev/pts devpts", "/dev/shm tmpfs"} <= mounts, who


def test_etc_hosts_is_created_when_absent_and_kept_when_present(pod):
    _, r = pod
    for who in ("main", "ro", "num"):  # ro: created although the app's rootfs is read-only
        assert one(r[who], "hosts") == "127.0.0.1 localhost|::1 localhost|", who
        assert one(r[who], "hosts-stat") == "644 0 0", who
    assert one(r["hosts"], "hosts") == "10.1.2.3 custom-host|"


def test_readonly_rootfs_gives_erofs(pod):
    _, r = pod
    rofs = os.strerror(errno.EROFS)
    for who in ("hosts", "ro"):
        assert "/ overlay ro" in values(r[who], "mount"), who
        assert one(r[who], "write").endswith(rofs), who
        assert one(r[who], "mkdir").endswith(rofs), who
    assert one(r["num"], "write") == "ok" and "/ overlay rw" in values(r["num"], "mount")


def _status(report) -> dict[str, str]:
    return dict(v.split(" ", 1) for v in values(report, "status"))


def test_capabilities_no_new_privs_and_seccomp(pod):
    _, r = pod
    zero = "0" * 16
    # non-root with a retain set: only the bounding set holds them (NET_BIND_SERVICE=10, KILL=5)
    assert _status(r["main"]) == {"CapInh": zero, "CapPrm": zero, "CapEff": zero, "CapBnd": "0000000000000420",
                                  "CapAmb": zero, "NoNewPrivs": "1", "Seccomp": "2"}
    # root without isolators: the default set everywhere but the ambient set
    assert _status(r["hosts"]) == {"CapInh": DEFAULT_CAPS, "CapPrm": DEFAULT_CAPS, "CapEff": DEFAULT_CAPS,
                                   "CapBnd": DEFAULT_CAPS, "CapAmb": zero, "NoNewPrivs": "0", "Seccomp": "0"}
    # non-root without isolators: the default bounding set, nothing else
    assert _status(r["ro"]) == {"CapInh": zero, "CapPrm": zero, "CapEff": zero, "CapBnd": DEFAULT_CAPS,
                                "CapAmb": zero, "NoNewPrivs": "0", "Seccomp": "0"}
    # root with a retain set (NET_ADMIN=12, CHOWN=0); @appc.io/all: no filter at all
    caps = "0000000000001001"
    assert _status(r["capsroot"]) == {"CapInh": caps, "CapPrm": caps, "CapEff": caps, "CapBnd": caps,
                                      "CapAmb": zero, "NoNewPrivs": "0", "Seccomp": "0"}
    # mkdir and mkdirat are removed with errno ENOTSUP; everything else works
    assert one(r["main"], "mkdir") == f"mkdir: can't create directory '/tmp/made': {os.strerror(errno.ENOTSUP)}"
    assert one(r["main"], "write") == "ok"
    assert one(r["num"], "mkdir") == "ok"
    # a retain set without the calls busybox needs: SIGSYS at its first one, nothing printed
    assert "sigsys" not in r


def test_unenforced_isolators_get_one_notice_each(pod):
    result, _ = pod
    notices = [line for line in result.stderr.decode().splitlines() if line.startswith("kvmpod: notice: app")]
    assert notices == ["kvmpod: notice: app main: isolator os/linux/oom-score-adj is not enforced",
                       "kvmpod: notice: app main: isolator example.com/custom is not enforced"]


def test_failing_pre_start_stops_the_app_with_one_line(kvmpod, images):
    result = kvmpod.run(str(images["prefail"]), "--name", "prefail")
    assert result.returncode == 125
    assert the_error(result) == "kvmpod: error: app prefail: pre-start handler /check/fail.sh exited with code 3"
    assert result.stdout == b"pre-start: failing\n"  # its output arrives; the app never ran


def test_user_path_that_does_not_exist_is_a_clear_error(kvmpod, images):
    result = kvmpod.run(str(images["plain"]), "--user", "/no/such/file")
    assert result.returncode == 125
    assert the_error(result) == ("kvmpod: error: user /no/such/file: No such file or directory in the app's rootfs")
    assert result.stdout == b""


def test_unknown_syscall_name_is_refused_by_the_agent(kvmpod, images):
    result = kvmpod.run(str(images["badcall"]))
    assert result.returncode == 125
    assert the_error(result) == "kvmpod: error: os/linux/seccomp-remove-set: unknown x86_64 syscall no_such_call"


def test_unimplemented_seccomp_group_is_refused_before_booting(kvmpod, images):
    result = kvmpod.run(str(images["dockerset"]), "--name", "docker")
    assert result.returncode == 125
    assert the_error(result) == ("kvmpod: error: app docker: isolator os/linux/seccomp-remove-set: "
                                 "@docker/default-blacklist is not supported (kvmpod implements @appc.io/empty "
                                 "there, and no other @-group)")
    assert "using TCG" not in result.stderr.decode()  # refused before any VM was considered
