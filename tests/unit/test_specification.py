"""SPECIFICATION.md stays true: what it names exists, and the limits it quotes are the defined ones.

What the specification's text is read for (conventions SPECIFICATION.md's introduction states):
  `path.py::name`, `path.py::Class::name`   a test, fixture, helper or bench function: `name` is a function
                                            (or class) at the top of that file, `Class::name` a method
  `path`, and bare docs/… bench/… paths     a file of this tree
  section `N. title`                        a section of `make bench`: bench/run_all.py prints a header
                                            starting with it
  `NAME = VALUE` after a `path` in a line   a limit: NAME in that file (a protocol.toml key, a Python
                                            module-level constant) has the value VALUE
Every bench function named must run under `make bench` (reachable from bench/run_all.py's main), every
limit protocol.toml defines (a key with "max" in its name) must be quoted, and every numbered promise
must name a test or a bench function that checks or measures it.
"""

from __future__ import annotations

import ast
import operator
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "SPECIFICATION.md"
PROTOCOL = "kvmpod/agent/protocol.toml"
RUN_ALL = "bench/run_all.py"

_SPAN = re.compile(r"`([^`\n]+)`")
_REF = re.compile(r"^([\w./-]+\.py)::(\w+)(?:::(\w+))?$")
_PATH = re.compile(r"^[\w.-]+(?:/[\w.-]+)+\.(?:py|toml|md|c|h|sh|txt|json)$")
_BARE_PATH = re.compile(r"(?<![\w/.<>-])((?:docs|bench|tests|kvmpod|guest-agent|packaging)/[\w./-]*\w\."
                        r"(?:py|toml|md|c|h|sh))(?![\w/<>-])")
_ASSIGN = re.compile(r"^([A-Za-z_]\w*) = (.+)$")
_SECTION = re.compile(r"section `(\d+\.[^`]*)`")
_PROMISE = re.compile(r"^## (\d+)\. (.+)$")


@dataclass(frozen=True)
class Ref:
    path: str
    name: str
    member: str | None
    line: int

    def __str__(self) -> str:
        return f"{self.path}::{self.name}" + (f"::{self.member}" if self.member else "")


@dataclass(frozen=True)
class Limit:
    path: str
    name: str
    value: str
    line: int


@dataclass
class Spec:
    refs: list[Ref]
    paths: list[tuple[str, int]]
    sections: list[tuple[str, int]]
    limits: list[Limit]
    unbound: list[tuple[str, int]]        # NAME = VALUE with no file before it on its line
    split: list[int]                      # lines where a `code span` runs on into the next line (unread)
    promises: dict[str, list[str]]        # "1. Start time" -> the refs in it


def parse(text: str) -> Spec:
    spec = Spec([], [], [], [], [], [], {})
    promise = None
    for number, line in enumerate(text.splitlines(), 1):
        if m := _PROMISE.match(line):
            promise = f"{m[1]}. {m[2]}"
            spec.promises[promise] = []
        elif line.startswith("## "):
            promise = None
        if line.count("`") % 2:
            spec.split.append(number)
        spec.sections += [(s, number) for s in _SECTION.findall(line)]
        spec.paths += [(p, number) for p in _BARE_PATH.findall(_SPAN.sub("", line))]
        last_path = None
        for span in _SPAN.findall(line):
            if m := _REF.match(span):
                ref = Ref(m[1], m[2], m[3], number)
                spec.refs.append(ref)
                if promise:
                    spec.promises[promise].append(str(ref))
            elif _PATH.match(span):
                spec.paths.append((span, number))
                last_path = span
            elif m := _ASSIGN.match(span):
                if last_path is None:
                    spec.unbound.append((span, number))
                else:
                    spec.limits.append(Limit(last_path, m[1], m[2], number))
    return spec


@cache
def spec() -> Spec:
    return parse(SPEC.read_text())


@cache
def module(path: str) -> ast.Module:
    return ast.parse((REPO / path).read_text(), filename=path)


def top_level(tree: ast.Module) -> dict[str, ast.AST]:
    return {node.name: node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def ref_problem(ref: Ref) -> str | None:
    if not (REPO / ref.path).is_file():
        return f"line {ref.line}: {ref}: no file {ref.path}"
    node = top_level(module(ref.path)).get(ref.name)
    if node is None:
        return f"line {ref.line}: {ref}: no function or class {ref.name} in {ref.path}"
    if ref.member is not None:
        if not isinstance(node, ast.ClassDef):
            return f"line {ref.line}: {ref}: {ref.name} is not a class"
        if ref.member not in top_level(ast.Module(body=node.body, type_ignores=[])):
            return f"line {ref.line}: {ref}: class {ref.name} has no {ref.member}"
    return None


# -- what make bench runs ------------------------------------------------------------------------

def bench_headers() -> list[str]:
    return [node.args[0].value for node in ast.walk(module(RUN_ALL))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "header"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]


def bench_reachable() -> set[tuple[str, str]]:
    """(bench file, function) pairs run by bench/run_all.py's main: the functions it calls, those they call
    in their own module, and functions imported from the other bench modules, followed the same way."""
    seen: set[tuple[str, str]] = set()
    todo = [(RUN_ALL, "main")]
    while todo:
        path, name = todo.pop()
        tree = module(path)
        function = top_level(tree).get(name)
        if (path, name) in seen or not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue   # seen, or not a function (an imported constant, a class)
        seen.add((path, name))
        imported = {alias.asname or alias.name: (f"bench/{node.module}.py", alias.name)
                    for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
                    and (REPO / "bench" / f"{node.module}.py").is_file() for alias in node.names}
        for node in ast.walk(function):
            if isinstance(node, ast.Name):   # called, or passed on (optional(measure, show, ...))
                todo.append(imported.get(node.id, (path, node.id)))
    return seen


# -- quoted limits -------------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Pow: operator.pow, ast.LShift: operator.lshift, ast.USub: operator.neg}


def literal(node: ast.AST) -> int | float:
    """The value of an integer expression made of literals (16 << 30, 0xFFFFF800, 1_000_000, 4 * 1024)."""
    if isinstance(node, ast.Expression):
        return literal(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](literal(node.left), literal(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](literal(node.operand))
    raise ValueError(f"not a literal expression: {ast.unparse(node)}")


def defined_value(path: str, name: str) -> int | float | str:
    if path.endswith(".toml"):
        with open(REPO / path, "rb") as f:
            table = tomllib.load(f)
        if name not in table:
            raise KeyError(f"{path} defines no top-level {name}")
        return table[name]
    if path.endswith(".py"):
        for node in module(path).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) and node.value is not None else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return literal(node.value)
        raise KeyError(f"{path} assigns no module-level {name}")
    raise KeyError(f"{path}: limits are read from .toml and .py files only")


def limit_problem(limit: Limit) -> str | None:
    where = f"line {limit.line}: {limit.path} {limit.name}"
    try:
        quoted = literal(ast.parse(limit.value, mode="eval"))
    except (SyntaxError, ValueError) as e:
        return f"{where}: the quoted value {limit.value!r} is not a number: {e}"
    try:
        actual = defined_value(limit.path, limit.name)
    except (OSError, KeyError, ValueError) as e:
        return f"{where}: {e}"
    if actual != quoted:
        return f"{where}: SPECIFICATION.md says {limit.value} ({quoted}), the file says {actual}"
    return None


# -- the checks ----------------------------------------------------------------------------------

def problems(s: Spec) -> list[str]:
    found = [p for p in map(ref_problem, s.refs) if p]
    found += [f"line {n}: no file {p}" for p, n in s.paths if not (REPO / p).exists()]
    headers = bench_headers()
    found += [f"line {n}: bench/run_all.py prints no section {title!r} (it prints {headers})"
              for title, n in s.sections
              if not any(h == title or h.startswith(title + " ") for h in headers)]
    reachable = bench_reachable()
    found += [f"line {r.line}: {r} is not run by `make bench` (not reachable from {RUN_ALL}::main)"
              for r in s.refs if r.path.startswith("bench/") and r.member is None and not ref_problem(r)
              and (r.path, r.name) not in reachable]
    found += [p for p in map(limit_problem, s.limits) if p]
    found += [f"line {n}: `{span}` quotes a limit but names no file before it on its line"
              for span, n in s.unbound]
    found += [f"line {n}: a `code span` runs on into the next line: keep each on one line to have it checked"
              for n in s.split]
    with open(REPO / PROTOCOL, "rb") as f:
        protocol = tomllib.load(f)
    quoted = {limit.name for limit in s.limits if limit.path == PROTOCOL}
    found += [f"{PROTOCOL} defines the limit {key} = {value}, which SPECIFICATION.md does not quote"
              for key, value in protocol.items() if "max" in key and not isinstance(value, (dict, list))
              and key not in quoted]
    found += [f"promise {title!r} names no test or bench function"
              for title, refs in s.promises.items() if not refs]
    return found


def test_the_specification_is_read_as_intended():
    """The parser finds what the file holds (a parser that matched nothing would pass everything)."""
    s = spec()
    assert len(s.promises) >= 9 and len(s.refs) >= 80 and len(s.limits) >= 13, (len(s.promises), len(s.refs),
                                                                               len(s.limits))
    assert len(s.sections) >= 9 and any(r.path.startswith("bench/") for r in s.refs)
    assert any(r.member for r in s.refs) and any(p == "bench/results/HISTORY.md" for p, _ in s.paths)
    assert "bench/run_all.py" in (REPO / "Makefile").read_text()   # what `make bench` runs


def test_every_reference_exists():
    s = spec()
    assert [p for p in map(ref_problem, s.refs) if p] == []
    assert [f"line {n}: {p}" for p, n in s.paths if not (REPO / p).exists()] == []


def test_every_bench_section_and_function_is_part_of_make_bench():
    s = spec()
    assert [p for p in problems(s) if "section" in p or "make bench" in p] == []


def test_quoted_limits_are_the_defined_ones():
    s = spec()
    assert [p for p in map(limit_problem, s.limits) if p] == []
    assert s.unbound == [] and s.split == []


def test_every_protocol_limit_is_quoted_and_every_promise_is_checked_by_something():
    assert [p for p in problems(spec()) if p.startswith((PROTOCOL, "promise"))] == []


def test_nothing_is_wrong():
    """All the checks at once: the list says everything to fix after a rename."""
    assert problems(spec()) == []


def test_the_checks_catch_a_stale_specification():
    """Each kind of drift is reported: a renamed test, a missing file, a gone bench section or function,
    a changed limit, a limit nobody quotes, a promise nothing checks."""
    text = SPEC.read_text()
    assert problems(parse(text)) == []
    cases = {
        "::test_stdin_respects_the_window`": "::test_stdin_respects_the_windowz`",
        "`bench/poweroff-init.c`": "`bench/poweroff-init.cc.c`",
        "section `5. cli`": "section `5. clix`",
        "`bench/run_all.py::cli`": "`bench/common.py::section_main`",   # a bench function make bench never runs
        "`max_payload = 262144`": "`max_payload = 262145`",
        "`kvmpod/disk/entries.py` `MAX_NAME_BYTES = 253`": "`kvmpod/disk/entries.py` `MAX_NAME_BYTES = 254`",
        "`kvmpod/agent/protocol.toml` `max_streams = 64`": "64 processes",
        "`tests/e2e/test_net.py::Netns::leftovers`": "`tests/e2e/test_net.py::Netns::leftover`",
        "section `4. scale`": "section `4.\nscale`",
    }
    for old, new in cases.items():
        assert old in text, old
        assert problems(parse(text.replace(old, new, 1))), f"{old} -> {new} went unnoticed"
    unchecked = re.sub(r"(## 5\. CLI start time\n)(.*?)(\n## )", lambda m: m[1] + "Fast.\n" + m[3], text,
                       flags=re.S)
    assert [p for p in problems(parse(unchecked)) if p.startswith("promise '5. CLI start time'")]
