"""What the guest agent enforces of an app's isolators, as data: the pod planning side builds it
(kvmpod/pod/spec.py) without loading the agent protocol; ProcessSpec.message() (kvmpod/agent/session.py)
puts it into START's CAPS_*, SECCOMP_* fields and flags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Isolators:
    """The isolators the guest agent enforces, as START carries them (docs/executor.md).

    A capability set of None means the isolator is absent (the agent then applies spec/ace.md's
    default bounding set); the same for the seccomp sets (no filter). At most one of each pair is set.
    """

    caps_retain: tuple[str, ...] | None = None
    caps_remove: tuple[str, ...] | None = None
    seccomp_retain: tuple[str, ...] | None = None
    seccomp_remove: tuple[str, ...] | None = None
    seccomp_errno: str = ""         # "" : blocked syscalls kill the process with SIGSYS
    no_new_privileges: bool = False
    seccomp_skip_unknown: bool = False   # names this architecture lacks are skipped (OCI profiles), not refused
