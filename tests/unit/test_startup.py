"""kvmpod/startup.py: the `kvmpod` command imports its modules with the cyclic GC paused and freezes what
they made; a program using the Python API keeps its collector and heap as they were. Each case runs in
a fresh interpreter (freezing pytest's own heap would outlive the test)."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import gc, json, sys
from kvmpod import startup
if sys.argv[1] == "owned":
    startup.own_the_process()
before = gc.get_freeze_count()
with startup.imports_without_gc():
    inside = gc.isenabled()
    import kvmpod.pod.launch  # noqa: F401  (a real import's worth of objects)
print(json.dumps({"inside": inside, "after": gc.isenabled(), "frozen": gc.get_freeze_count() - before}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_the_commands_imports_run_without_the_collector_and_their_objects_are_frozen():
    got = probe("owned")
    assert got["inside"] is False and got["after"] is True
    assert got["frozen"] > 10_000   # the modules' objects: left out of every later collection


def test_a_program_using_the_api_keeps_its_collector_and_heap_as_they_were():
    assert probe("library") == {"inside": True, "after": True, "frozen": 0}


def test_the_kvmpod_entry_point_owns_its_process(tmp_path):
    # cli.entry() ends the process with exit_now(); replaced here to report instead
    script = ("import gc, json, sys\n"
              "import kvmpod.cli as cli\n"
              "from kvmpod import startup\n"
              "cli.exit_now = lambda code: print(json.dumps({'code': code, 'owned': startup._own_process,"
              " 'frozen': gc.get_freeze_count(), 'gc': gc.isenabled()}))\n"
              "sys.argv = ['kvmpod', 'list']\n"
              "cli.entry()\n")
    env = {"KVMPOD_RUN_DIR": str(tmp_path / "run"), "KVMPOD_STORE_DIR": str(tmp_path / "store"),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    got = json.loads(out.splitlines()[-1])
    assert got["code"] == 0 and got["owned"] is True and got["gc"] is True and got["frozen"] > 0
