"""`python -m kvmpod.pod.resume`: a pod's kvmpod process coming back from kvmpod-relay (kvmpod/pod/relay.py).

kvmpod-relay execs this with the state the process left (--state), the agent bytes it read but did
not relay (--unread), why it came back (--why), the signal it took if that was why (--signal), and
the output fds that failed meanwhile (--broken). It is not a command for users: every fd it names
was inherited across two execs of the same process.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvmpod.pod.resume")
    parser.add_argument("--state", type=int, required=True)
    parser.add_argument("--unread", type=int, required=True)
    parser.add_argument("--why", default="")
    parser.add_argument("--signal", type=int, default=0)
    parser.add_argument("--broken", type=int, action="append", default=[])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from kvmpod.outcome import configure_logging, exit_now, reporting_failures
    from kvmpod.pod.handover import read_state

    args = _parse(sys.argv[1:] if argv is None else argv)
    state = read_state(args.state)
    with os.fdopen(args.unread, "rb") as f:
        unread = f.read()
    configure_logging(state.options.debug)

    def resume() -> int:
        import asyncio
        import logging

        from kvmpod.pod.run import run_after_relay

        logging.getLogger(__name__).debug("idle relay: back (%s)", args.why)
        return asyncio.run(run_after_relay(state, unread, set(args.broken), args.signal))

    exit_now(reporting_failures(resume, lambda: state.options.debug))


if __name__ == "__main__":
    main()
