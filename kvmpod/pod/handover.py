"""The hand-over record: what a pod's kvmpod process leaves for the next image of itself when it
execs kvmpod-relay (relay.py), and how the next one reads it back (resume.py, run.py). Its format is
documented in docs/relay.md, "The hand-over record".

The record is JSON in a memfd. Between the write and the read the pod may sit in the relay for days,
and the install is editable: an upgrade or a `git pull` in between changes the code that reads it.
So the record is explicit and versioned, never a pickle of whatever classes were loaded:

- an envelope every version of kvmpod can read (`Envelope`): the format's name, its version, and
  exactly what it takes to end the pod cleanly without understanding the rest (the pod directory,
  QEMU's pid, --keep, --detach, --debug, the network mode);
- the body: the RelayState, unstructured by cattrs into plain JSON from the dataclasses' own fields
  and types, and structured back (checked: every field present and of its type, no unknown one).

HANDOVER_VERSION says which body this code writes and reads. Any change to a dataclass the body holds
changes the body, and must bump it: tests/unit/test_handover.py fingerprints the body's schema
(`body_schema()`) and fails when the schema changes and the version does not. A record of another
version (or one that does not read) raises HandoverError with the envelope, when it could be read:
resume.py ends the pod with it, cleanly, in one line.

cattrs is imported on first use: only the hand-over and the way back pay for it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from kvmpod.agent.session import ExitStatus, Hello
from kvmpod.errors import KvmpodError
from kvmpod.net.attach import PodNetwork
from kvmpod.pod.options import RunOptions
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.spec import ResolvedApp
from kvmpod.pod.volumes import PodVolumes
from kvmpod.vm.qemu import QemuHandover

if TYPE_CHECKING:
    from cattrs.preconf.json import JsonConverter

HANDOVER_FORMAT = "kvmpod-handover"
# the body's version: bump it with any change to a dataclass the body holds (docs/relay.md lists them)
HANDOVER_VERSION = 4
T = TypeVar("T")
MAX_RECORD = 64 << 20    # bytes: far above any real pod's record (a few KiB per app)


@dataclass
class AppProcess:
    """One app's process as the next kvmpod process adopts it."""
    stream: int
    pid: int
    status: ExitStatus | None   # it has ended already
    stdout_fd: int
    stderr_fd: int
    log: bool                     # --detach: both streams go to the app's log file


@dataclass
class RelayState:
    """The runner as the next kvmpod process rebuilds it (kvmpod/pod/resume.py)."""
    pod: PodDir
    apps: list[ResolvedApp]
    options: RunOptions
    timings: dict[str, float]
    hostname: str
    volumes: PodVolumes
    network: PodNetwork | None
    qemu: QemuHandover
    hello: Hello
    next_stream: int
    finished: set[int]
    processes: list[AppProcess]
    agent_fd: int
    control_fd: int
    claim_fds: tuple[int, ...]
    broken: set[int] = field(default_factory=set)   # output fds that failed: their output is dropped
    handovers: int = 1


@dataclass(frozen=True)
class Envelope:
    """The part of the record every version of kvmpod reads: enough to end the pod cleanly without
    understanding the body (kvmpod/pod/resume.py)."""
    version: int
    uuid: str
    path: Path               # the pod directory
    qemu_pid: int            # QEMU: this process's child
    keep: bool               # --keep: the pod directory stays
    detach: bool             # --detach: the directory stays once the apps have started (their logs)
    apps_started: bool
    debug: bool              # --debug: a failure shows its causes
    network_mode: str        # RunOptions.network.mode (its release is read from net.json in the pod directory)

    @classmethod
    def of(cls, state: RelayState) -> "Envelope":
        return cls(HANDOVER_VERSION, state.pod.uuid, state.pod.path, state.qemu.pid, state.options.keep,
                   state.options.detach, "apps_started" in state.timings, state.options.debug,
                   state.options.network.mode)

    def to_json(self) -> dict[str, Any]:
        return {"format": HANDOVER_FORMAT, "version": self.version,
                "pod": {"uuid": self.uuid, "path": str(self.path)}, "qemu_pid": self.qemu_pid,
                "keep": self.keep, "detach": self.detach, "apps_started": self.apps_started,
                "debug": self.debug, "network_mode": self.network_mode}

    @classmethod
    def from_json(cls, record: object) -> "Envelope":
        """The envelope of a parsed record; HandoverError (without an envelope) if it is not one."""
        if not isinstance(record, dict) or record.get("format") != HANDOVER_FORMAT:
            raise HandoverError("the pod's hand-over record is not a kvmpod hand-over record")
        pod = record.get("pod")
        pod = pod if isinstance(pod, dict) else {}

        def get(where: dict[str, Any], name: str, kind: type[T], shown: str = "") -> T:
            value = where.get(name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise HandoverError(f"the pod's hand-over record has no valid envelope field {shown or name}")
            return value

        return cls(get(record, "version", int), get(pod, "uuid", str, "pod.uuid"),
                   Path(get(pod, "path", str, "pod.path")), get(record, "qemu_pid", int), get(record, "keep", bool),
                   get(record, "detach", bool), get(record, "apps_started", bool), get(record, "debug", bool),
                   get(record, "network_mode", str))


class HandoverError(KvmpodError):
    """The hand-over record cannot be written or read back. `envelope` is what could be read of it
    (None when not even that): resume.py ends the pod with it."""

    def __init__(self, message: str, envelope: Envelope | None = None):
        super().__init__(message)
        self.envelope = envelope


def memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    try:
        os.set_inheritable(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def encode_record(state: RelayState) -> bytes:
    """The record of `state` (docs/relay.md): ASCII JSON (non-ASCII and undecodable path bytes escaped).
    HandoverError if `state` holds what cannot cross an exec (a callback in its options)."""
    body = _converter().unstructure(state, RelayState)
    record = {**Envelope.of(state).to_json(), "body": body}
    try:
        return json.dumps(record, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as e:
        raise HandoverError(f"the pod's state does not fit a hand-over record: {e}") from e


def decode_record(data: bytes) -> RelayState:
    """The RelayState of a record encode_record() wrote; HandoverError if it is not one this code reads."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise HandoverError("the pod's hand-over record is not a kvmpod hand-over record (not JSON)") from e
    envelope = Envelope.from_json(record)
    if envelope.version != HANDOVER_VERSION:
        raise HandoverError(f"the pod's hand-over record is version {envelope.version}, this kvmpod reads "
                            f"version {HANDOVER_VERSION} (kvmpod was changed while the pod was idle)", envelope)
    try:
        converter = _converter()
    except ImportError as e:  # kvmpod was changed under the pod, and its dependencies not installed
        raise HandoverError(f"the pod's hand-over record cannot be read: {e}", envelope) from e
    try:
        state = converter.structure(record.get("body"), RelayState)
    except Exception as fast:  # whatever the cause, the body does not fit: the detailed converter says where
        try:
            _converter(detailed=True).structure(record.get("body"), RelayState)
        except Exception as e:
            raise HandoverError(f"the pod's hand-over record does not fit this kvmpod: {_cause(e)}", envelope) from e
        raise HandoverError(f"the pod's hand-over record does not fit this kvmpod: {_cause(fast)}", envelope) from fast
    if Envelope.of(state) != envelope:
        raise HandoverError("the pod's hand-over record contradicts itself (envelope and body differ)", envelope)
    return state


def write_record(state: RelayState) -> int:
    """A memfd holding the record of `state` (inheritable, at offset 0), for the relay's argv."""
    return memfd("kvmpod-pod-state", encode_record(state))


def read_record(fd: int) -> RelayState:
    """The state in the memfd `fd` (closed); HandoverError as decode_record()."""
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_RECORD + 1)
    except OSError as e:
        raise HandoverError(f"the pod's hand-over record cannot be read: fd {fd}: {e.strerror}") from e
    if len(data) > MAX_RECORD:
        raise HandoverError(f"the pod's hand-over record exceeds {MAX_RECORD} bytes")
    return decode_record(data)


def _cause(error: BaseException) -> str:
    """One line for a cattrs error: the first of its messages (with the field's path), and how many more."""
    import cattrs

    messages = cattrs.transform_error(error, path="body") if isinstance(error, cattrs.BaseValidationError) else []
    first = messages[0] if messages else f"{type(error).__name__}: {error}"
    more = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
    return " ".join(first.split()) + more


# -- the body's schema: the dataclasses it holds, their fields and types ---------------------------

# Names some dataclasses of the body only import for type checkers (RunOptions.on_exited's ExitStatus)
_TYPE_NAMES: dict[str, Any] = {"ExitStatus": ExitStatus}


def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their resolved types."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError:
        hints = typing.get_type_hints(cls, localns=_TYPE_NAMES)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def record_classes(root: type = RelayState) -> list[type]:
    """Every dataclass the body holds, `root` first, each once."""
    found: list[type] = []

    def visit(t: Any) -> None:
        if dataclasses.is_dataclass(t) and isinstance(t, type):
            if t not in found:
                found.append(t)
                for ft in field_types(t).values():
                    visit(ft)
        for arg in typing.get_args(t):
            visit(arg)

    visit(root)
    return found


def body_schema() -> str:
    """The body's schema as text, one line per dataclass (fields and types, in order) and per enum
    (its values): what HANDOVER_VERSION stands for (tests/unit/test_handover.py fingerprints it)."""
    lines = []
    enums: list[type[enum.Enum]] = []
    for cls in record_classes():
        hints = field_types(cls)
        lines.append(f"{_name(cls)}(" + ", ".join(f"{n}: {_type_text(t, enums)}" for n, t in hints.items()) + ")")
    for e in enums:
        lines.append(f"{_name(e)}{{" + ", ".join(f"{m.name}={m.value!r}" for m in e) + "}")
    return "\n".join(lines)


def _name(cls: type) -> str:
    """A class by its name alone: moving it to another module changes nothing in the record."""
    return cls.__qualname__


def _type_text(t: Any, enums: list[type[enum.Enum]]) -> str:
    if t is type(None):
        return "None"
    if t is Any:
        return "Any"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is collections.abc.Callable or t is collections.abc.Callable:
        return "Callable"   # always null in a record: its signature is not part of the format
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a, enums) for a in args)
    if origin is not None:
        name = getattr(origin, "__qualname__", str(origin))
        inner = ", ".join("[" + ", ".join(_type_text(x, enums) for x in a) + "]" if isinstance(a, list)
                          else "..." if a is Ellipsis else _type_text(a, enums) for a in args)
        return f"{name}[{inner}]"
    if isinstance(t, type) and issubclass(t, enum.Enum) and t not in enums:
        enums.append(t)
    if isinstance(t, type):
        return _name(t)
    return repr(t)


# -- the converter -----------------------------------------------------------------------------------

def _is_callable(t: Any) -> bool:
    """A callback field (RunOptions.on_started...), optional or not: it must be None in a record."""
    if typing.get_origin(t) is collections.abc.Callable or t is collections.abc.Callable:
        return True
    return typing.get_origin(t) in (typing.Union, types.UnionType) and any(_is_callable(a) for a in typing.get_args(t))


def _no_callback(value: Any) -> None:
    if value is not None:
        raise HandoverError(f"the pod's options hold a callback ({value!r}), which cannot cross an exec")


def _is_set(t: Any) -> bool:
    return typing.get_origin(t) in (set, frozenset, collections.abc.Set) or t in (set, frozenset)


@functools.cache
def _converter(detailed: bool = False) -> "JsonConverter":
    """cattrs' JSON converter, made strict (no unknown keys) and told what the body's types need.
    `detailed`: its errors say which field failed (cattrs' detailed validation, which costs a third
    more on the way back): only used once a record has failed to read."""
    from cattrs.preconf.json import make_converter

    converter = make_converter(forbid_extra_keys=True, detailed_validation=detailed)
    for cls in record_classes():  # their annotations resolved here: cattrs resolves none of a TYPE_CHECKING name
        for f, t in zip(dataclasses.fields(cls), field_types(cls).values()):
            f.type = t
    converter.register_unstructure_hook(Path, str)

    def structure_path(value: Any, _: type) -> Path:
        if not isinstance(value, str):
            raise TypeError(f"a path must be a string, not {type(value).__name__}")
        return Path(value)

    converter.register_structure_hook(Path, structure_path)
    # sets as sorted lists: the same state always makes the same bytes
    converter.register_unstructure_hook_factory(
        _is_set, lambda t: lambda value: sorted(converter.unstructure(v) for v in value))
    converter.register_unstructure_hook_factory(_is_callable, lambda _: _no_callback)

    def structure_callback(value: Any, _: type) -> None:
        if value is not None:
            raise TypeError("a callback field must be null in a hand-over record")
        return None

    converter.register_structure_hook_factory(_is_callable, lambda _: structure_callback)
    for kind in (str, int, float, bool):  # as JSON has them: cattrs' own hooks would make "false" True
        converter.register_structure_hook(kind, _exactly(kind))
    converter.register_structure_hook_factory(_is_record_class, lambda cls: _every_field(converter, cls))
    return converter


def _is_record_class(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _exactly(kind: type) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        given = type(value)
        if given is not kind and not (kind is float and given is int):
            raise TypeError(f"{kind.__name__} expected, not {given.__name__}")
        return float(value) if kind is float else value
    return structure


def _every_field(converter: "JsonConverter", cls: type) -> Callable[[Any, Any], Any]:
    """cattrs' structure function for the dataclass `cls`, but a field with a default is no less
    required: this code writes every field, so a record that leaves one out was not written by it."""
    from cattrs.errors import AttributeValidationNote, ClassValidationError
    from cattrs.gen import make_dict_structure_fn

    generated: Callable[[Any, Any], Any] = make_dict_structure_fn(cls, converter)
    fields = [(f.name, f.type) for f in dataclasses.fields(cls)]

    def structure(value: Any, _: Any) -> Any:
        if isinstance(value, dict) and (missing := [(n, t) for n, t in fields if n not in value]):
            errors = []
            for name, t in missing:
                error = KeyError(name)
                error.add_note(AttributeValidationNote(f"Structuring class {cls.__qualname__} @ attribute {name}",
                                                       name, t))
                errors.append(error)
            raise ClassValidationError(f"While structuring {cls.__qualname__}", errors, cls)
        return generated(value, cls)
    return structure
