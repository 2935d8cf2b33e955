"""The Python API against real VMs: a two-app pod with its output captured, exit statuses, streaming, the
timeout, and the exception class of each kind of failure."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvmpod
from kvmpod import errors


@pytest.fixture
def image(busybox_aci, kvmpod_env) -> str:
    return str(busybox_aci)


def test_two_app_pod_output_and_exit_status(image):
    pod = kvmpod.Pod([kvmpod.App(image, name="first", exec="/bin/sh", args=["-c", "echo one; echo err1 >&2"]),
                      kvmpod.App(image, name="second", exec="/bin/sh",
                                 args=["-c", "echo two-$POD_VAR-$APP_VAR; exit 3"], env={"APP_VAR": "b"})],
                     env={"POD_VAR": "p"}, net="none")
    result = pod.run(timeout=200)
    assert result.exit_code == 3
    assert sorted(result.stdout.decode().splitlines()) == ["one", "two-p-b"]
    assert result.stderr == b"err1\n"
    assert len(result.uuid or "") == 36
    assert "kvmpod: error" not in result.messages   # kvmpod's own notices are kept apart from the apps'


def test_run_shorthand_input_and_check(image):
    result = kvmpod.run(image, "-c", "cat; exit 0", exec="/bin/sh", input=b"through stdin\n", net="none",
                        timeout=200)
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"through stdin\n", b"")
    with pytest.raises(kvmpod.AppExitError, match="exited with status 9") as caught:
        kvmpod.run(image, "-c", "echo partial; exit 9", exec="/bin/sh", net="none", timeout=200, check=True)
    assert caught.value.exit_code == 9 and caught.value.result.stdout == b"partial\n"


def test_streaming_output_arrives_while_the_pod_runs(image):
    """The app says "ready" and then waits for stdin: reading "ready" before writing proves the output is
    streamed, not collected at the end."""
    pod = kvmpod.Pod(kvmpod.App(image, exec="/bin/sh", args=["-c", "echo ready; read x; echo got-$x; exit 4"]),
                     net="none")
    with pod.start(stdin=kvmpod.PIPE) as proc:
        assert proc.stdout.readline() == b"ready\n"
        assert proc.wait_started(200) == proc.uuid and proc.uuid
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        assert proc.stdout.read() == b"got-go\n"
        result = proc.wait(timeout=200)
    assert result.exit_code == 4


def test_timeout_stops_the_pod(image, kvmpod_env):
    pod = kvmpod.Pod(kvmpod.App(image, exec="/bin/sh", args=["-c", "echo started; exec sleep 600"]), net="none",
                     stop_timeout=2)
    proc = pod.start()
    assert proc.wait_started(200)   # the app runs: the timeout below falls while it does
    with pytest.raises(kvmpod.PodTimeout, match="did not end within 1 s") as caught:
        proc.communicate(timeout=1)
    result = caught.value.result
    # stopped like `kvmpod stop`: SIGTERM to the app (sleep dies of it); what it wrote is there
    assert (result.exit_code, result.stdout, result.uuid) == (128 + 15, b"started\n", proc.uuid)
    assert list(Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods").glob("*")) == []


def test_timeout_while_the_pod_is_planned(kvmpod_env):
    """The image download hangs (a server that accepts and never answers): the timeout stops the pod
    before it has a VM, and nothing of it is left (the autouse fixture checks the pod directories)."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/image.aci"
        with pytest.raises(kvmpod.PodTimeout) as caught:
            kvmpod.run(url, net="none", timeout=2)
    assert (caught.value.result.exit_code, caught.value.result.uuid) == (128 + 15, None)
    assert list(Path(kvmpod_env["KVMPOD_STORE_DIR"], "tmp").iterdir()) == []


@pytest.mark.parametrize("make, error, exit_code, message", [
    (lambda image: kvmpod.Pod("/nonexistent/image.aci", net="none"), errors.ImageError, 125, "no such image file"),
    (lambda image: kvmpod.Pod(kvmpod.App(image, exec="/no/such/program"), net="none"), errors.AppStartError, 127,
     "/no/such/program"),
    (lambda image: kvmpod.Pod(image, net="none", kernel="/nonexistent/kernel"), errors.KernelError, 125,
     "guest kernel not found"),
    (lambda image: kvmpod.Pod(kvmpod.App(image, user="nobody-here"), net="none"), errors.KvmpodError, 125,
     "nobody-here"),
])
def test_failures_raise_their_class(image, make, error, exit_code, message):
    with pytest.raises(error, match=message) as caught:
        make(image).run(timeout=200)
    assert caught.value.exit_code == exit_code
    assert isinstance(caught.value.result, kvmpod.PodResult)


def test_the_pod_ends_with_the_program_that_started_it(image, kvmpod_env):
    """A program that dies without stopping its pod: the worker gets SIGTERM (PR_SET_PDEATHSIG) and the
    pod ends, its VM and directory gone (the autouse fixture checks them)."""
    import subprocess
    import sys
    import time

    code = ("import kvmpod, os, sys\n"
            f"proc = kvmpod.Pod(kvmpod.App({image!r}, exec='/bin/sleep', args=['600']), net='none').start()\n"
            "proc.wait_started(200)\n"
            "print(proc.pid, flush=True)\n"
            "os._exit(0)\n")
    program = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    worker = int(program.stdout)
    deadline = time.time() + 60   # the pod's stop: SIGTERM to sleep, which dies of it
    while Path(f"/proc/{worker}").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists(), "the worker outlived the program that started it"
