"""kvmpod as rkt's stage1: the entrypoints of the stage1 ACI `make stage1` builds (docs/stage1.md).

rkt's stage0 renders a pod directory (pod manifest, the stage1 ACI, each app's rootfs as a directory
tree) and execs the ACI's entrypoints in it, following Documentation/devel/stage1-implementors-guide.md.
Here: flags (their argv, as stage0 spells it), lock (RKT_LOCK_FD), poddir (reading what stage0 wrote,
writing pid and status files), network (--net and --dns-conf-mode), run (the run entrypoint), pods
(enter, stop, gc), build (the ACI). `python -m kvmpod.stage1 ENTRYPOINT ARGS...` is what the ACI's
entrypoint scripts exec.
"""
