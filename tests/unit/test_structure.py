"""The package's structure, as docs/architecture.md draws it: imports point one way (no circle anywhere in
kvmpod/, function-local imports included), the pod runtime's layers, and the start path's promises
(planning imports no event loop; the command line's grammar loads no command)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

from kvmpod.version import __version__

REPO = Path(__file__).resolve().parents[2]

# The pod runtime, top to bottom: a module may import those below it, never one above.
POD_LAYERS = ["kvmpod.pod.entry", "kvmpod.pod.detach", "kvmpod.pod.resume", "kvmpod.pod.run", "kvmpod.pod.runner",
              "kvmpod.pod.control", "kvmpod.pod.relay", "kvmpod.pod.handover", "kvmpod.pod.launch",
              "kvmpod.pod.admission", "kvmpod.pod.state", "kvmpod.pod.options", "kvmpod.pod.output"]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("kvmpod", include_external_packages=True)


def cycles(graph: grimp.ImportGraph, package: str = "kvmpod") -> list[tuple[str, ...]]:
    """One shortest circle through each import of `package` that is part of one."""
    ours = (package, f"{package}.")
    found: set[tuple[str, ...]] = set()
    for importer in sorted(m for m in graph.modules if m.startswith(ours)):
        for imported in graph.find_modules_directly_imported_by(importer):
            if not imported.startswith(ours) or imported == importer:
                continue
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                circle = (importer, *back)
                start = circle.index(min(circle[:-1]))  # one spelling per circle
                found.add(circle[start:-1] + circle[:start + 1])
    return sorted(found)


def test_no_import_circle_in_the_package(graph):
    assert cycles(graph) == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles(graph))


def test_the_cycle_finder_finds_a_circle(tmp_path, monkeypatch):
    pkg = tmp_path / "circ"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circ import b\n")
    (pkg / "b.py").write_text("def f():\n    from circ import a\n")  # function-local imports count
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cycles(grimp.build_graph("circ"), "circ") == [("circ.a", "circ.b", "circ.a")]


def test_the_pod_runtime_imports_downwards_only(graph):
    upward = [(low, high) for i, high in enumerate(POD_LAYERS) for low in POD_LAYERS[i + 1:]
              if graph.chain_exists(importer=low, imported=high)]
    assert upward == [], f"a lower layer of kvmpod/pod/ imports a higher one: {upward}"


def fresh_imports(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    return set(out.split())


def test_planning_imports_no_event_loop_so_qemu_spawns_first():
    # kvmpod/pod/entry.py: QEMU is spawned from a boot snapshot before the second half is imported
    loaded = fresh_imports("import kvmpod.pod.entry, kvmpod.pod.launch, kvmpod.cli.run")
    assert not loaded & {"asyncio", "qemu.qmp", "kvmpod.pod.run", "kvmpod.pod.runner", "kvmpod.agent.session"}


def test_the_command_line_grammar_loads_no_command():
    loaded = fresh_imports("import kvmpod.cli; kvmpod.cli.build_parser()")
    assert not {m for m in loaded if m.startswith(("kvmpod.pod", "kvmpod.store", "kvmpod.vm", "kvmpod.image.manifest"))}
    assert not loaded & {"asyncio", "dataclasses", "jsonschema"}


def test_modules_do_not_import_the_package_root_facade(graph):
    # kvmpod/__init__.py hands out the Python API lazily; a module importing it would tie itself to the API
    importers = graph.find_modules_that_directly_import("kvmpod") - {"kvmpod"}
    assert importers == set()


def test_the_version_is_pyprojects():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
