#!/usr/bin/env python3
"""Start-time benchmark: `kvmpod run` of a trivial app against the floor, measured in the same run.

The floor is bare QEMU with the same kernel, machine, command line and initrd contents, whose /init
powers off at once: what no VM launcher can go below. kvmpod's figure is a cold `kvmpod` process with
warm caches (image disk and initrd already built), the way a user's second run is.

Usage: bench/start.py [--runs N] [--kernel distro]   (prints a table; not a test, asserts nothing)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_busybox_aci, measure_start, print_start  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--kernel", default=None, help="kernel kind or path, as `kvmpod run --kernel` takes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmpod-bench-") as tmp:
        work = Path(tmp)
        print_start(measure_start(work, build_busybox_aci(work), args.runs, args.kernel))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
