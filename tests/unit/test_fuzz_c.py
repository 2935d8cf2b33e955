"""Coverage-guided fuzzing of the guest agent's C parsers (issue 23; docs/reliability.md, "Fuzzing"):
the libFuzzer harnesses in guest-agent/fuzz/, built with clang, AddressSanitizer and
UndefinedBehaviorSanitizer by `make -C guest-agent fuzz` (in a scratch build dir), each run for a few
seconds from its seed corpus (guest-agent/fuzz/corpus/NAME/; new inputs go to a temp dir, the repo's
seeds stay as they are).

    fuzz_tlv     the TLV decoder (src/tlv.c over the generated tables): every host -> guest payload
    fuzz_frames  the channel's framing (src/frame.c), reads cut anywhere, and each frame's payload decoded
    fuzz_http    the metadata service's HTTP request parser (src/http_parse.c): what apps send to PID 1
    fuzz_stdin   a process's stdin window (src/stdin_window.c): STDIN frames against short writes

A crash, a sanitizer report, a failed check in a harness, a timeout or running out of memory fails the
test, which shows the input (hex) and the end of libFuzzer's report; the input is kept in the test's
temp dir. FUZZ_SECONDS=N runs each target N seconds instead (tests/fuzzing.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fuzzing import FUZZ_SECONDS

AGENT = REPO / "guest-agent"
TARGETS = ["tlv", "frames", "http", "stdin"]
SECONDS = int(FUZZ_SECONDS) or 3   # per target in the normal suite: ~12 s for the four


@pytest.fixture(scope="module")
def fuzzers(tmp_path_factory) -> Path:
    if not shutil.which("clang"):
        pytest.skip("clang is missing: `make deps` installs it (the Makefile's DEB_PACKAGES)")
    build = tmp_path_factory.mktemp("fuzz-build")
    result = subprocess.run(["make", "-s", "-C", str(AGENT), "fuzz", f"BUILD={build}", f"PYTHON={sys.executable}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return build / "fuzz"


def run_target(binary: Path, seeds: Path, work: Path, seconds: int) -> subprocess.CompletedProcess:
    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    return subprocess.run(
        [str(binary), f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
         f"-artifact_prefix={work}/", str(corpus), str(seeds)],
        capture_output=True, text=True, timeout=seconds + 120)


def _report(result: subprocess.CompletedProcess, work: Path) -> str:
    """What a failing run shows: each crash input in hex, then the end of libFuzzer's output."""
    lines = []
    for artifact in sorted(work.glob("*-*")):
        if artifact.is_file():
            data = artifact.read_bytes()
            lines.append(f"{artifact} ({len(data)} bytes): {data[:512].hex()}{'...' if len(data) > 512 else ''}")
    return "\n".join(lines + ["libFuzzer said:", result.stderr[-4000:]])


@pytest.mark.parametrize("target", TARGETS)
def test_the_agents_parsers_survive_coverage_guided_fuzzing(fuzzers, target, tmp_path):
    seeds = AGENT / "fuzz" / "corpus" / target
    assert any(seeds.iterdir()), f"{seeds} has no seed inputs"
    result = run_target(fuzzers / f"fuzz_{target}", seeds, tmp_path, SECONDS)
    assert result.returncode == 0, f"fuzz_{target} failed:\n" + _report(result, tmp_path)
    runs = re.search(r"stat::number_of_executed_units: (\d+)", result.stderr)
    assert runs and int(runs.group(1)) > 0, result.stderr[-2000:]
    print(f"fuzz_{target}: {runs.group(1)} inputs in {SECONDS} s, no crash")


def test_every_seed_runs_clean(fuzzers, tmp_path):
    """The seeds alone (what a regression of a past crash would be added as): each runs once, without
    mutations, so a seed that crashes fails here with its name."""
    for target in TARGETS:
        seeds = sorted((AGENT / "fuzz" / "corpus" / target).iterdir())
        result = subprocess.run([str(fuzzers / f"fuzz_{target}"), f"-artifact_prefix={tmp_path}/",
                                 *map(str, seeds)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"fuzz_{target}: a seed fails:\n" + _report(result, tmp_path)
