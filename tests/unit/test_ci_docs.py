"""docs/ci.md's example CI configurations (docs/examples/): valid YAML of the right structure, shown
verbatim in docs/ci.md, and their `kvmpod run` command lines accepted by kvmpod's own parser. They
cannot run here (no GitHub or GitLab runner); what they use runs in tests/e2e/test_ci.py."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from kvmpod import cli
from kvmpod.cli.parser import parse
from kvmpod.cli.run import _parse_apps
from kvmpod.pod.volumes import parse_volume

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
# what the runner's shell would put in their place
SHELL_VALUES = {'"$GITHUB_WORKSPACE"': "/home/runner/work/app/app", '"$CI_PROJECT_DIR"': "/builds/group/app"}


def load(name: str) -> dict:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(data, dict)
    return data


def kvmpod_run_argv(command: str) -> list[str]:
    """`sudo kvmpod run ...` of a step, as the shell would pass it to kvmpod."""
    for word, value in SHELL_VALUES.items():
        command = command.replace(word, value)
    assert "$" not in command, command
    argv = shlex.split(command)
    assert argv[:3] == ["sudo", "kvmpod", "run"], argv[:3]
    return argv[2:]


def check_run_command(command: str, checkout: str) -> None:
    argv = kvmpod_run_argv(command)
    ns = parse(cli.build_parser(), argv)
    [volume] = [parse_volume(v) for v in ns.volume]
    assert (volume.kind, volume.source, volume.owner) == ("host", checkout, "source")
    assert ns.net == "none" and ns.timeout == 40 * 60 and ns.memory == 2048 and ns.cpus == 2
    assert ns.volume == [f"src,kind=host,source={checkout},owner=source"]
    [app] = _parse_apps(ns.app_words, ns.image, ns.pod_flags)
    assert (app.image, app.exec, app.args, app.user, app.group, app.working_dir) == (
        "example.com/ci-debian:12", "/bin/sh", ["-c", "make test"], None, None, "/src")


def test_github_actions_workflow():
    workflow = load("github-actions.yml")
    # YAML 1.1 reads the key `on` as True: GitHub reads it as "on"
    assert workflow.get("on", workflow.get(True)) == ["push", "pull_request"]
    job = workflow["jobs"]["test"]
    assert "self-hosted" in job["runs-on"] and job["timeout-minutes"] > 40
    steps = job["steps"]
    assert steps[0] == {"uses": "actions/checkout@v4"}
    assert all(set(step) <= {"name", "uses", "run", "if", "with", "env"} for step in steps)
    runs = [step["run"] for step in steps if "run" in step]
    assert runs[0] == "sudo kvmpod doctor"
    check_run_command(runs[1], SHELL_VALUES['"$GITHUB_WORKSPACE"'])
    assert steps[-1]["if"] == "always()" and steps[-1]["run"] == "sudo kvmpod gc"


def test_gitlab_ci_job():
    config = load("gitlab-ci.yml")
    job = config["test"]
    assert config["stages"] == ["test"] and job["stage"] == "test" and job["tags"] == ["kvmpod"]
    assert job["script"][0] == "sudo kvmpod doctor"
    check_run_command(job["script"][1], SHELL_VALUES['"$CI_PROJECT_DIR"'])
    assert job["after_script"] == ["sudo kvmpod gc"]


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_docs_ci_shows_each_example_verbatim(name):
    text = (EXAMPLES / name).read_text()
    page = (REPO / "docs" / "ci.md").read_text()
    assert f"```yaml\n{text}```" in page
    assert f"(examples/{name})" in page
