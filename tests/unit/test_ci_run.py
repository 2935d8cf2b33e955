"""What a CI job needs of `kvmpod run` (docs/ci.md), the parts that need no VM: --timeout's durations
and exit status, the pod it keeps out of the idle relay, and --debug's timings line. The jobs
themselves run in tests/e2e/test_ci.py."""

from __future__ import annotations

import argparse
from decimal import Decimal

import pytest

from kvmpod import cli, errors
from kvmpod.cli.parser import parse
from kvmpod.cli.types import duration
from kvmpod.errors import EXIT_TIMEOUT, RunTimeout, UsageError
from kvmpod.pod.options import RunOptions
from kvmpod.pod.relay import unfit
from kvmpod.pod.runner import describe_timings


@pytest.mark.parametrize("text, seconds", [("2s", 2), ("90", 90), ("1.5s", 1.5), ("5m", 300), ("1h30m", 5400),
                                           ("500ms", 0.5), ("1m30s", 90), ("2d", 172800)])
def test_durations(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "-1", "1 h", "1.s", "0", "0s", "m5"])
def test_bad_durations_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_timeout_flag_reaches_the_options_and_a_bad_one_is_one_line():
    ns = parse(cli.build_parser(), ["run", "--timeout", "5m", "img"])
    assert ns.timeout == 300
    assert parse(cli.build_parser(), ["run", "img"]).timeout is None
    with pytest.raises(UsageError, match="--timeout: '5 minutes' is not a duration"):
        parse(cli.build_parser(), ["run", "--timeout", "5 minutes", "img"])


def test_timeout_status_is_distinct_from_every_other_kvmpod_status():
    assert RunTimeout("x").exit_code == EXIT_TIMEOUT == 124
    others = {v for k, v in vars(errors).items() if k.startswith("EXIT_") and k != "EXIT_TIMEOUT"}
    assert EXIT_TIMEOUT not in others and all(EXIT_TIMEOUT < o for o in others)  # 128+N are signals


def test_a_pod_with_a_timeout_stays_out_of_the_idle_relay():
    """kvmpod-relay keeps no clock: the process that keeps the timeout stays."""
    assert unfit(RunOptions(timeout=2.0), False, "serial") == "its --timeout is kept by this process"
    assert unfit(RunOptions(), False, "serial") is None


def test_timings_line_names_each_phase_reached():
    t = {"start": 100.0, "qemu_spawn": 100.25, "agent_ready": 101.0, "apps_started": 101.125, "apps_exited": 103.0,
         "vm_ended": 103.5}
    assert describe_timings(t) == ("planning 0.250 s, QEMU to agent 0.750 s, apps' start 0.125 s, apps 1.875 s, "
                                   "teardown 0.500 s, total 3.500 s")
    assert describe_timings({"start": 1.0, "qemu_spawn": 1.5}) == "planning 0.500 s"


def test_a_runners_defaults_come_from_its_config_and_flags_and_limits_still_win(tmp_path, monkeypatch):
    from kvmpod.errors import ConfigError
    from kvmpod.pod.resources import AppResources, size_vm

    conf = tmp_path / "kvmpod.toml"
    monkeypatch.setenv("KVMPOD_CONFIG", str(conf))
    app = AppResources("job", None, None)
    assert (size_vm([app], host_cpus=4).memory_mib, size_vm([app], host_cpus=4).cpus) == (256, 1)
    conf.write_text('[run]\nmemory = "2G"\ncpus = 8\n')
    size = size_vm([app], host_cpus=4)
    assert (size.memory_mib, size.cpus) == (2048, 4)   # no more vCPUs than the host has
    assert size.reason == f"memory: [run] memory in {conf}; cpus: [run] cpus in {conf}"
    assert (size_vm([app], memory_mib=512, cpus=1, host_cpus=4).memory_mib,
            size_vm([app], memory_mib=512, cpus=1, host_cpus=4).cpus) == (512, 1)
    limited = size_vm([AppResources("job", Decimal(1 << 30), Decimal(2))], host_cpus=4)
    assert (limited.memory_mib, limited.cpus) == (1024 + 64, 2)
    conf.write_text('[run]\nmemory = "lots"\n')
    with pytest.raises(ConfigError, match=r"\[run\] memory in .*'lots' is not a size"):
        size_vm([app], host_cpus=4)
