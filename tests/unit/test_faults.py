"""$KVMPOD_TEST_FAULT (kvmpod/faults.py): its grammar, each action, and nothing at all when it is unset. The
phases themselves are driven through real pods in tests/e2e/test_faults.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmpod import faults
from kvmpod.errors import ConfigError


def fire(spec: str | None, code: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"} | ({faults.ENV: spec} if spec is not None else {})
    return subprocess.run([sys.executable, "-c", f"from kvmpod import faults\n{code}"], capture_output=True,
                          text=True, env=env, timeout=30)


def test_the_grammar():
    assert faults.parse("disk:kill-self") == {"disk": "kill-self"}
    assert faults.parse("spawn:kill-qemu, teardown:stop-self") == {"spawn": "kill-qemu", "teardown": "stop-self"}
    for bad in ("disk", "disk:explode", "everywhere:kill-self", ""):
        with pytest.raises(ConfigError, match=r"\$KVMPOD_TEST_FAULT: .* is not PHASE:ACTION \(phases: import,"):
            faults.parse(bad)


def test_unset_it_does_nothing():
    result = fire(None, "for p in faults.PHASES: faults.at(p, 1)\nprint('went on')")
    assert (result.returncode, result.stdout, result.stderr) == (0, "went on\n", "")


def test_kill_self_at_its_phase_only():
    result = fire("disk:kill-self", "faults.at('import')\nprint('past import', flush=True)\nfaults.at('disk')\n"
                                    "print('past disk')")
    assert result.returncode == -9
    assert result.stdout == "past import\n"
    assert result.stderr == "kvmpod: notice: test fault: kill-self at disk\n"


def test_kill_qemu_and_stop_qemu_act_on_the_vm_and_go_on():
    vm = subprocess.Popen(["sleep", "60"])
    try:
        result = fire("spawn:stop-qemu,handshake:kill-qemu",
                      f"faults.at('spawn', {vm.pid})\nimport time\n"
                      f"state = lambda: open('/proc/{vm.pid}/stat').read().rsplit(')', 1)[1].split()[0]\n"
                      "for _ in range(500):\n    if state() == 'T': break\n    time.sleep(0.01)\n"
                      "print(state(), flush=True)\n"
                      f"faults.at('handshake', {vm.pid})\nfaults.at('handshake', None)\nprint('went on')")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "T\nwent on\n"   # stopped, then killed; at a site without a VM: nothing
        assert vm.wait(timeout=10) == -9
        assert result.stderr.splitlines() == ["kvmpod: notice: test fault: stop-qemu at spawn",
                                              "kvmpod: notice: test fault: kill-qemu at handshake"]
    finally:
        vm.kill()
        vm.wait()


def test_a_bad_spec_is_a_clear_error_at_the_first_site():
    result = fire("disk:explode", "faults.at('import')")
    assert result.returncode == 1 and "ConfigError: $KVMPOD_TEST_FAULT: 'disk:explode' is not PHASE:ACTION" in result.stderr
