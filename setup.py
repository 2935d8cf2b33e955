"""setuptools hooks (everything else is in pyproject.toml): a wheel carries the guest agent and kvmpod-relay.

Both are small static C programs (the agent in guest-agent/, the relay in kvmpod/relay/; guest-agent's
Makefile builds both, with musl-gcc where musl-tools is installed, else with gcc's static libc). They
are compiled while the wheel is built, into kvmpod/libexec/ of the wheel, and the wheel is then tagged
for this platform (py3-none-linux_x86_64), not as pure Python. A wheel build without a C compiler fails
with a one-line error naming the Debian packages: a kvmpod without its agent could run no pod. An
editable install (`make setup`) compiles nothing: a checkout uses guest-agent/build/ (`make agent`).
docs/install.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

HERE = Path(__file__).resolve().parent
PROGRAMS = ("kvmpod-agent", "kvmpod-relay")


def _compile_programs(build_dir: Path) -> None:
    """`make -C guest-agent` with its build directory in build_dir (the source tree stays untouched)."""
    if shutil.which("make") is None:
        raise SetupError("kvmpod: building the wheel compiles the guest agent: `make` not found "
                         "(apt-get install make gcc musl-tools)")
    if not os.environ.get("CC") and not shutil.which("gcc"):  # musl-gcc too is a wrapper around gcc
        raise SetupError("kvmpod: building the wheel compiles the guest agent and kvmpod-relay (static C): "
                         "no C compiler (apt-get install gcc musl-tools)")
    cmd = ["make", "-s", "-C", str(HERE / "guest-agent"), f"BUILD={build_dir}", f"PYTHON={sys.executable}",
           f"-j{len(os.sched_getaffinity(0))}", "all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise SetupError(f"kvmpod: compiling the guest agent failed (exit {proc.returncode}): "
                         f"{' / '.join(lines[-3:]) or 'no output'}")


class BuildPyWithPrograms(build_py):
    """build_py, plus the compiled agent and relay in kvmpod/libexec/ (wheels and regular installs)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "kvmpod" / "libexec"
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="kvmpod-agent-build-") as tmp:
            _compile_programs(Path(tmp))
            for name in PROGRAMS:
                shutil.copyfile(Path(tmp) / name, target / name)
                (target / name).chmod(0o755)


class PlatformWheel(bdist_wheel):
    """The wheel holds x86_64 ELF programs, but no Python extension: any Python 3, this platform. (Its
    root stays purelib: the programs sit in the package directory, wherever that is installed.)"""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", sysconfig.get_platform().replace("-", "_").replace(".", "_")


setup(cmdclass={"build_py": BuildPyWithPrograms, "bdist_wheel": PlatformWheel})
