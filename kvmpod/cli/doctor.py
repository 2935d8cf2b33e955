"""`kvmpod doctor [--json]`: what this host offers and what kvmpod will do (kvmpod/doctor.py)."""

from __future__ import annotations

import argparse
import json
import sys

from kvmpod import doctor

EXIT_CANNOT_RUN = 1   # a check failed: pods cannot run here (docs/cli.md)


def cmd_doctor(ns: argparse.Namespace) -> int:
    checks = doctor.examine()
    if ns.json:
        json.dump(doctor.report(checks), sys.stdout, indent=2)
        print()
    else:
        for check in checks:
            print(check.line())
    blocking = [c for c in checks if c.status == doctor.FAIL]
    if not ns.json:
        print(doctor.verdict(checks))
        sys.stdout.flush()
        for check in blocking:
            print(f"kvmpod: error: pods cannot run here: {check.name}: {check.reason}", file=sys.stderr)
    return EXIT_CANNOT_RUN if blocking else 0
