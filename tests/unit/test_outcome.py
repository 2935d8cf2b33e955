"""How a command's failure is reported (kvmpod/outcome.py): one line, and with --debug its causes."""

from __future__ import annotations

import pytest

from kvmpod.errors import EXIT_KVMPOD_FAILURE, KvmpodError, VMError
from kvmpod.outcome import causes, reporting_failures


def failing() -> int:
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise VMError("QEMU could not write its log") from e
    except VMError as e:
        raise KvmpodError("the pod could not start") from e


def test_a_failure_is_one_line_without_debug(capsys):
    assert reporting_failures(failing, lambda: False) == EXIT_KVMPOD_FAILURE
    assert capsys.readouterr().err == "kvmpod: error: the pod could not start\n"


def test_debug_shows_every_cause_nearest_first(capsys):
    assert reporting_failures(failing, lambda: True) == EXIT_KVMPOD_FAILURE
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == ["kvmpod: error: the pod could not start",
                       "kvmpod: caused by: VMError: QEMU could not write its log",
                       "kvmpod: caused by: OSError: [Errno 28] No space left on device"]
    assert any(line.startswith("Traceback") for line in err[3:])


def test_from_none_ends_the_chain_and_cycles_end():
    try:
        try:
            raise ValueError("hidden")
        except ValueError:
            raise KvmpodError("shown") from None
    except KvmpodError as e:
        assert causes(e) == []
    a, b = KvmpodError("a"), KvmpodError("b")
    a.__cause__, b.__cause__ = b, a
    assert causes(a) == [b]


@pytest.mark.parametrize("debug", [False, True])
def test_a_bug_is_one_line_or_its_traceback(capsys, debug):
    def bug() -> int:
        raise ZeroDivisionError("division by zero")
    if debug:
        with pytest.raises(ZeroDivisionError):
            reporting_failures(bug, lambda: True)
    else:
        assert reporting_failures(bug, lambda: False) == EXIT_KVMPOD_FAILURE
        assert "internal error: ZeroDivisionError" in capsys.readouterr().err


@pytest.mark.parametrize("debug", [True, False])
def test_debug_logging_is_kvmpods_own_lines_only(debug):
    """--debug shows kvmpod's debug lines, not a third-party library's (pyroute2 dumps every netlink
    message at DEBUG); their warnings still show. In a child: logging's configuration is per process."""
    import subprocess
    import sys

    code = ("import logging, sys; from kvmpod.outcome import configure_logging; configure_logging(sys.argv[1] == '1');"
            "logging.getLogger('kvmpod.pod.runner').debug('ours');"
            "logging.getLogger('pyroute2.netlink.nlsocket').debug('netlink dump');"
            "logging.getLogger('qemu.qmp.protocol').debug('qmp message');"
            "logging.getLogger('pyroute2.ndb').warning('their warning')")
    err = subprocess.run([sys.executable, "-c", code, "1" if debug else "0"], capture_output=True, text=True,
                         check=True).stderr
    assert err.splitlines() == (["kvmpod: ours"] if debug else []) + ["kvmpod: their warning"]
