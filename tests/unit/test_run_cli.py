"""`kvmpod run`'s command line in rkt's forms: several images one after another (`run IMG1 IMG2`),
each with its app flags, `---` needed only after `-- ARGS`; and an unknown pod flag named as such."""

from __future__ import annotations

import pytest

from kvmpod import cli
from kvmpod.cli import run as cli_run
from kvmpod.cli.parser import parse


def _apps(argv: list[str]) -> list[tuple]:
    ns = parse(cli.build_parser(), argv)
    return [(a.image, a.exec, a.name, a.args) for a in cli_run._parse_apps(ns.app_words, ns.image, ns.pod_flags)]


@pytest.mark.parametrize("argv, expected", [
    (["run", "a.aci", "b.aci"], [("a.aci", None, None, None), ("b.aci", None, None, None)]),
    (["run", "--net", "none", "a.aci", "--exec", "/bin/sh", "b.aci", "--name", "bee"],
     [("a.aci", "/bin/sh", None, None), ("b.aci", None, "bee", None)]),
    (["run", "a.aci", "--exec=/x", "--", "b.aci", "-c", "---", "c.aci"],   # after -- ARGS only --- ends them
     [("a.aci", "/x", None, ["b.aci", "-c"]), ("c.aci", None, None, None)]),
    (["run", "a.aci", "---", "b.aci", "c.aci", "--", "x"],
     [("a.aci", None, None, None), ("b.aci", None, None, None), ("c.aci", None, None, ["x"])]),
    (["run", "--set-env=A=1", "-i", "a.aci", "--set-env", "B=2", "b.aci"],
     [("a.aci", None, None, None), ("b.aci", None, None, None)]),
])
def test_images_follow_each_other_with_their_app_flags(argv, expected):
    assert _apps(argv) == expected


def test_pod_flag_values_are_not_taken_for_the_image():
    ns = parse(cli.build_parser(), ["run", "--memory", "512M", "--hostname=web", "-i", "img"])
    assert (ns.memory, ns.hostname, ns.interactive, ns.image, ns.app_words) == (512, "web", True, "img", [])


def test_global_flags_before_run_are_not_the_command():
    ns = parse(cli.build_parser(), ["--dir", "run", "run", "img", "--exec", "/bin/true"])
    assert (ns.dir, ns.image, ns.app_words) == ("run", "img", ["--exec", "/bin/true"])


@pytest.mark.parametrize("argv, message", [
    (["run", "--bogus", "x", "IMG", "--exec", "/bin/true"],
     "run: unknown flag --bogus (pod flags go before the first IMAGE; kvmpod run --help)"),
    (["run", "--bogus=1", "IMG"], "run: unknown flag --bogus (pod flags go before the first IMAGE; kvmpod run --help)"),
    (["run", "IMG", "--memory", "1G"], "run: --memory (after IMG) is a pod flag: it goes before the first IMAGE"),
    (["run", "IMG", "--bogus"], "run: --bogus (after IMG) is not an app flag"),
    (["run", "IMG", "b.aci", "--bogus"], "run: --bogus (after b.aci) is not an app flag"),
    (["run", "--", "IMG"], "run: -- must follow an IMAGE"),
    (["run", "IMG", "---"], "run: an image must follow ---"),
])
def test_misplaced_and_unknown_flags_are_named(argv, message, capsys):
    assert cli.main(argv) == 125
    assert capsys.readouterr().err == f"kvmpod: error: {message}\n"
