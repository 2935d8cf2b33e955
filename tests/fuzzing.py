"""The fuzzing tests' one knob (docs/reliability.md, "Fuzzing"): bounded in the normal suite, time-bounded
on demand.

    @fuzz(max_examples=80)
    @given(...)
    def test_...(...): ...

In the normal suite a property runs `max_examples` examples, each with no per-example deadline (the CI
machine has 2 shared cores: timings are not asserted anywhere). With FUZZ_SECONDS=N in the environment,
each property instead runs hypothesis again and again, in batches of FUZZ_BATCH examples, until N
seconds have passed (its database keeps what one batch found for the next), and pytest-timeout
leaves it that long; at the end it prints how many examples ran (pytest -s shows it). Every failure is
shrunk by hypothesis and printed as the minimal example.

    FUZZ_SECONDS=300 .venv/bin/python -m pytest -q -s tests/unit/test_fuzz_agent.py
"""

from __future__ import annotations

import functools
import os
import signal
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS") or 0)
FUZZ_BATCH = 1000


def fuzz(max_examples: int, **extra) -> Callable:
    """The settings of a fuzzing property (put it above @given)."""
    base = settings(max_examples=FUZZ_BATCH if FUZZ_SECONDS else max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large],
                    **extra)

    def decorate(test: Callable) -> Callable:
        test = base(test)
        if not FUZZ_SECONDS:
            return test

        inner = test.hypothesis.inner_test   # hypothesis lets a wrapper take its place: counts examples
        examples = 0

        def counted(*args, **kwargs):
            nonlocal examples
            examples += 1
            return inner(*args, **kwargs)

        test.hypothesis.inner_test = counted

        @functools.wraps(test)
        def looped(*args, **kwargs):
            start = time.monotonic()
            while True:
                test(*args, **kwargs)
                if time.monotonic() - start >= FUZZ_SECONDS:
                    break
            print(f"\n{test.__name__}: {examples} examples in {time.monotonic() - start:.0f} s, no failure")

        return pytest.mark.timeout(FUZZ_SECONDS * 2 + 300)(looped)

    return decorate


class Hang(Exception):
    """A synchronous step ran past its bound (a loop the guest could make endless)."""


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread if the block takes longer than `seconds` (wall clock, generous:
    it catches endless loops, it measures nothing). pytest-timeout's own alarm (the same timer) is
    given back afterwards, less the time the block took."""
    def expired(signo, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    start = time.monotonic()
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            left = max(outer_delay - (time.monotonic() - start), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)
