"""Shell completion: the script `kvmpod completion bash|zsh` prints, loaded into a real bash (interactive)
and zsh, completing commands, flags, choices, pod UUIDs from the runtime dir and image names from the store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpod.cli import build_parser
from kvmpod.completion import command_tree, script
from tests.conftest import kvmpod_cmd

UUIDS = ["6f1c2a3b-0000-4000-8000-000000000001", "6f9d4e5f-0000-4000-8000-000000000002",
         "7a000000-0000-4000-8000-000000000003"]


@pytest.fixture
def shim(tmp_path) -> Path:
    """A `kvmpod` on PATH that is this checkout's (the script calls the kvmpod being completed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kvmpod").write_text(f"#!/bin/sh\nexec {sys.executable} -m kvmpod \"$@\"\n")
    (bin_dir / "kvmpod").chmod(0o755)
    return bin_dir


@pytest.fixture
def completion_env(kvmpod_env, shim, tmp_path) -> dict[str, str]:
    pods = Path(kvmpod_env["KVMPOD_RUN_DIR"]) / "pods"
    for uuid in UUIDS:
        (pods / uuid).mkdir(parents=True, exist_ok=True)
    env = {**kvmpod_env, "PATH": f"{shim}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    yield env
    for uuid in UUIDS:
        (pods / uuid).rmdir()


def bash_complete(env: dict[str, str], line: str, tmp_path: Path) -> list[str]:
    """What TAB offers at the end of `line`, in an interactive bash that loaded the generated script."""
    path = tmp_path / "kvmpod.bash"
    path.write_text(subprocess.run(kvmpod_cmd("completion", "bash"), capture_output=True, text=True,
                                   check=True, env=env).stdout)
    words = line.split(" ")
    driver = (f"source {path}\n"
              "complete -p kvmpod >&2\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
              f"COMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE={line!r}\nCOMP_POINT={len(line)}\n"
              "_kvmpod\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-i"], input=driver, capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert "complete -F _kvmpod kvmpod" in proc.stderr, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def test_bash_completes_commands_flags_and_choices(completion_env, tmp_path):
    assert bash_complete(completion_env, "kvmpod ru", tmp_path) == ["run"]
    assert bash_complete(completion_env, "kvmpod s", tmp_path) == ["status", "stop", "setup"]
    assert bash_complete(completion_env, "kvmpod image ca", tmp_path) == ["cat-manifest"]
    assert bash_complete(completion_env, "kvmpod run --acc", tmp_path) == ["--accel"]
    assert bash_complete(completion_env, "kvmpod run --accel ", tmp_path) == ["auto", "kvm", "tcg"]
    assert bash_complete(completion_env, "kvmpod setup --only q", tmp_path) == ["qemu"]
    assert bash_complete(completion_env, "kvmpod completion ", tmp_path) == ["bash", "zsh"]
    # app flags after the IMAGE; nothing after `--` (the app's own arguments)
    assert bash_complete(completion_env, "kvmpod run img.aci --read", tmp_path) == ["--readonly-rootfs"]
    assert bash_complete(completion_env, "kvmpod run img.aci -- --read", tmp_path) == []
    assert "__complete" not in bash_complete(completion_env, "kvmpod _", tmp_path)


def test_bash_completes_pod_uuid_prefixes(completion_env, tmp_path):
    assert bash_complete(completion_env, "kvmpod status 6f", tmp_path) == UUIDS[:2]
    assert bash_complete(completion_env, "kvmpod stop 6f9", tmp_path) == [UUIDS[1]]
    assert bash_complete(completion_env, f"kvmpod rm {UUIDS[0]} 7", tmp_path) == [UUIDS[2]]  # repeatable
    assert bash_complete(completion_env, "kvmpod enter --app x 7a", tmp_path) == [UUIDS[2]]


def test_bash_completes_image_names_and_files(completion_env, busybox_aci, tmp_path):
    subprocess.run(kvmpod_cmd("fetch", str(busybox_aci)), check=True, capture_output=True, env=completion_env)
    names = bash_complete(completion_env, "kvmpod image rm example.com/b", tmp_path)
    assert "example.com/busybox" in names and all(n.startswith("example.com/b") for n in names)  # and NAME:VERSION
    (tmp_path / "web.aci").write_bytes(b"")
    got = bash_complete(completion_env, "kvmpod run --net none ", tmp_path)
    assert "example.com/busybox" in got and "web.aci" in got   # a store name, or a file
    # --dir STORE typed earlier: the names come from that store (an empty one here)
    assert bash_complete(completion_env, f"kvmpod --dir {tmp_path / 'other'} image rm ex", tmp_path) == []


def type_in(shell: list[str], env: dict[str, str], prelude: str, keys: bytes) -> bytes:
    """`keys` typed into an interactive shell on a terminal (a pty), after the `prelude` line."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(shell, stdin=slave, stdout=slave, stderr=slave,
                            env={**env, "TERM": "dumb", "INPUTRC": "/dev/null"}, start_new_session=True)
    os.close(slave)
    os.write(master, prelude.encode() + b"\n" + keys + b"exit\n")
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:   # EIO: bash has exited and the pty is closed
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
        proc.wait(timeout=60)
    return out


def test_tab_in_an_interactive_bash(completion_env, tmp_path):
    """Real keystrokes: `kvmpod ru<TAB>` and `kvmpod status 6f9<TAB>`, then ^A and `echo :` before the
    line, so that bash prints what TAB made of it."""
    path = tmp_path / "kvmpod.bash"
    path.write_text(subprocess.run(kvmpod_cmd("completion", "bash"), capture_output=True, text=True,
                                   check=True, env=completion_env).stdout)
    out = type_in(["bash", "--norc", "--noprofile", "-i"], completion_env, f"source {path}",
                  b"kvmpod ru\t\x01echo :\nkvmpod status 6f9\t\x01echo :\n")
    lines = out.decode(errors="replace").splitlines()
    assert ":kvmpod run" in lines, out
    assert f":kvmpod status {UUIDS[1]}" in lines, out


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (make setup installs it)")
def test_zsh_script_loads_and_completes(completion_env, tmp_path):
    path = tmp_path / "_kvmpod"
    path.write_text(subprocess.run(kvmpod_cmd("completion", "zsh"), capture_output=True, text=True,
                                   check=True, env=completion_env).stdout)
    assert path.read_text().startswith("#compdef kvmpod\n")
    subprocess.run(["zsh", "-n", str(path)], check=True)
    driver = (f"autoload -U compinit && compinit -u -D\nsource {path}\nprint -r -- \"${{_comps[kvmpod]}}\"\n"
              "_kvmpod_core ru\n_kvmpod_core 6f status\n_kvmpod_core '' run --boot\n")
    proc = subprocess.run(["zsh", "-f"], input=driver, capture_output=True, text=True, env=completion_env,
                          cwd=tmp_path, timeout=60)
    assert proc.stdout.splitlines() == ["_kvmpod", "run", *UUIDS[:2], "snapshot", "cold"], proc.stderr
    # and real keystrokes in an interactive zsh with compinit
    out = type_in(["zsh", "-f", "-i"], completion_env, f"autoload -U compinit && compinit -u -D && source {path}",
                  b"kvmpod ru\t\x01echo :\nkvmpod status 6f9\t\x01echo :\n")
    lines = out.decode(errors="replace").splitlines()
    assert ":kvmpod run" in lines and f":kvmpod status {UUIDS[1]}" in lines, out


def test_generated_from_the_parser():
    """A command or flag added to the parser is completed without any edit to the completion code."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    frob = sub.add_parser("frobnicate", help="new")
    frob.add_argument("--level", choices=["low", "high"])
    frob.add_argument("uuid", metavar="UUID")
    nodes = {n.path: n for n in command_tree(parser)}
    assert "frobnicate" in nodes["kvmpod"].commands
    assert nodes["kvmpod frobnicate"].values["--level"] == "low high"
    assert nodes["kvmpod frobnicate"].positionals == ["@pods"]
    assert "'kvmpod frobnicate --level' 'low high'" in script(parser, "bash")
