"""The appc executor rules through kvmpod's stage1: test_executor.py's report script and images, run
as rkt pods (tests/stage0.py), and its checks applied to what the apps see there. The apps' roots
are their rendered rootfs directories over virtio-fs here, not rootfs disks.

rkt stops a pod at its first failing app, so the apps that end on purpose with a failure run apart
from the others: `main` (exit 7, after its report and its handlers) alone, then `hosts`, `ro`, `num`
and `capsroot` together."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e import test_executor as executor
from tests.e2e.test_stage1 import Rkt, stage1_aci  # noqa: F401  (stage1_aci: a fixture)
from tests.stage0 import App

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd needs root")
images = executor.images   # the module-scoped fixture, shared


@pytest.fixture(scope="module")
def stage1_pod(images, stage1_aci, kvmpod_dirs, tmp_path_factory):  # noqa: F811
    """(a CompletedProcess of both runs' output, the reports by app, the status files)."""
    env = {**os.environ, **kvmpod_dirs}
    r = Rkt(tmp_path_factory.mktemp("rkt-executor"), stage1_aci, env)
    pods = [r.prepare([App(images["main"], name="main", env={"POD_VAR": "pod"})]),
            r.prepare([App(images["hosts"], name="hosts", readonly_rootfs=True, env={"POD_VAR": "pod"}),
                       App(images["plain"], name="ro", readonly_rootfs=True, user="/check/owned",
                           group="/check/owned", env={"POD_VAR": "pod"}),
                       App(images["plain"], name="num", user="4321", group="8765", env={"POD_VAR": "pod"}),
                       App(images["capsroot"], name="capsroot", env={"POD_VAR": "pod"})])]
    results = [r.run(pod, r.run_argv(pod, net="none", debug=True), env=env) for pod in pods]
    statuses = {k: v for pod in pods for k, v in r.statuses(pod).items()}
    for pod in pods:
        r.gc(pod, env=env)
    out = b"".join(res.stdout for res in results)
    both = subprocess.CompletedProcess([], results[0].returncode, out, b"".join(res.stderr for res in results))
    return both, executor.reports(out), statuses, [res.returncode for res in results]


def test_exit_statuses(stage1_pod):
    _, _, statuses, codes = stage1_pod
    assert codes == [7, 0]
    assert statuses == {"main": 7, "hosts": 0, "ro": 0, "num": 0, "capsroot": 0}


@pytest.mark.parametrize("check", [
    executor.test_handlers_run_in_order_as_the_app_with_its_user_and_directory,
    executor.test_users_and_groups_by_name_number_and_path,
    executor.test_dev_proc_sys_are_there,
    executor.test_etc_hosts_is_created_when_absent_and_kept_when_present,
    executor.test_capabilities_no_new_privs_and_seccomp,
    executor.test_unenforced_isolators_get_one_notice_each,
], ids=lambda f: f.__name__.removeprefix("test_"))
def test_executor_rules_hold_through_the_stage1(stage1_pod, check):
    result, reports, _, _ = stage1_pod
    check((result, reports))


def test_environment_is_exact(stage1_pod):
    """test_executor's check, with one metadata service per pod (two pods here)."""
    _, r, _, _ = stage1_pod
    for who in ("main", "main/pre-start", "main/post-stop"):
        assert executor.env_of(r[who]) == executor.MAIN_ENV, who
    assert executor.env_of(r["num"]) == executor.expected_env("num")
    assert executor.one(r["main"], "args") == "first arg second"
    assert executor.one(r["main/pre-start"], "args") == "pre arg"
    urls = {e for who in ("main", "main/pre-start", "main/post-stop") for e in executor.values(r[who], "env")
            if executor.METADATA_URL.fullmatch(e)}
    assert len(urls) == 1


def test_readonly_rootfs_gives_erofs(stage1_pod):
    _, r, _, _ = stage1_pod
    rofs = os.strerror(__import__("errno").EROFS)
    for who in ("hosts", "ro"):
        assert executor.one(r[who], "write").endswith(rofs), who
        assert executor.one(r[who], "mkdir").endswith(rofs), who
    assert executor.one(r["num"], "write") == "ok"
