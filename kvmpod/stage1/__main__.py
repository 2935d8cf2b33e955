"""`python -m kvmpod.stage1 run|enter|stop|gc ARGS...`: what the stage1 ACI's entrypoint scripts exec.

A failure is one line `kvmpod-stage1: error: ...` on stderr and rkt's exit status for it, 254 (an app
that cannot be executed keeps kvmpod's 126/127; a pod killed by a second signal 128+N).
"""

from __future__ import annotations

import sys

from kvmpod.errors import EXIT_KVMPOD_FAILURE, KvmpodError
from kvmpod.outcome import exit_now
from kvmpod.stage1.flags import EXIT_STAGE1_FAILURE
from kvmpod.startup import own_the_process

ENTRYPOINTS = ("run", "enter", "stop", "gc")


def _entrypoint(name: str):
    # Each entrypoint loads only its own modules: run pulls the pod launcher, enter and stop the
    # control client (asyncio), which gc does without.
    if name == "run":
        from kvmpod.stage1.run import run
        return run
    from kvmpod.stage1 import pods
    return getattr(pods, name)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ENTRYPOINTS:
        print(f"kvmpod-stage1: error: usage: python -m kvmpod.stage1 {'|'.join(ENTRYPOINTS)} ARGS...",
              file=sys.stderr)
        return EXIT_STAGE1_FAILURE
    debug = any(w.startswith("-") and w.lstrip("-").partition("=")[0] == "debug"
                and w.partition("=")[2] in ("", "1", "t", "T", "true", "True", "TRUE") for w in argv[1:])
    try:
        return _entrypoint(argv[0])(argv[1:])
    except KvmpodError as e:
        print(f"kvmpod-stage1: error: {e}", file=sys.stderr, flush=True)
        return EXIT_STAGE1_FAILURE if e.exit_code == EXIT_KVMPOD_FAILURE else e.exit_code
    except KeyboardInterrupt:
        print("kvmpod-stage1: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, the traceback with --debug
        if debug:
            raise
        print(f"kvmpod-stage1: internal error: {type(e).__name__}: {e} (run with --debug for details)",
              file=sys.stderr)
        return EXIT_STAGE1_FAILURE


if __name__ == "__main__":
    own_the_process()   # the pod's second half imports with the GC paused (kvmpod/startup.py)
    exit_now(main(sys.argv[1:]))
