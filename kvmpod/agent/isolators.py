"""What the guest agent enforces of an app's isolators, as data: the pod planning side builds it
(kvmpod/pod/spec.py) without loading the agent protocol; AgentSession puts it into START."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmpod.agent import protocol as p


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

    def fields(self) -> list[tuple["p.Field", "p.FieldValue | str"]]:
        from kvmpod.agent import protocol as p  # loaded with the session: planning a pod does not need it

        lists = ((p.Field.CAPS_RETAIN, self.caps_retain), (p.Field.CAPS_REMOVE, self.caps_remove),
                 (p.Field.SECCOMP_RETAIN, self.seccomp_retain), (p.Field.SECCOMP_REMOVE, self.seccomp_remove))
        out: list[tuple[p.Field, p.FieldValue | str]] = [(tag, v) for tag, values in lists for v in values or ()]
        if self.seccomp_errno:
            out.append((p.Field.SECCOMP_ERRNO, self.seccomp_errno))
        return out
