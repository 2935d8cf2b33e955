"""The stage1 entrypoints' command lines, exactly as rkt's stage0 spells them.

rkt's stage1 programs parse their arguments with Go's `flag` package, and stage0 relies on its rules:
a flag is `-name` or `--name`; a value flag takes `--name=value` or `--name value`; a bool flag is
`--name`, `--name=true` or `--name=false` (strconv.ParseBool's spellings), never `--name false`;
parsing stops at the first word that is not a flag, or after `--`; a flag given twice keeps the last
value. What follows the flags are the positional arguments (the pod's UUID, enter's command).
An unknown flag, a bad bool or a missing value is a one-line Stage1Error.

Per entrypoint (Documentation/devel/stage1-implementors-guide.md, interface version 5):

    run    [--debug] [--net=NETS] [--interactive] [--mds-token=T] [--local-config=DIR]
           [--private-users=SHIFT] [--hostname=NAME] [--mutable] [--disable-capabilities-restriction]
           [--disable-paths] [--disable-seccomp] [--dns-conf-mode=resolv=M,hosts=M] UUID
    enter  --pid=PID --appname=NAME -- CMD [ARGS...]
    gc     [--debug] [--local-config DIR] UUID
    stop   [--force] UUID
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvmpod.errors import KvmpodError

# rkt's own exit status for a failure of rkt or its stage1 (rkt#3129): an rkt user tells it from an
# app's exit status by it, as kvmpod's users do by 125.
EXIT_STAGE1_FAILURE = 254

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
RESOLV_MODES = ("host", "stage0", "none", "default")
HOSTS_MODES = ("host", "stage0", "default")


class Stage1Error(KvmpodError):
    """The stage1 ABI was not followed: a bad argument, a pod directory stage0 did not render, no lock."""

    exit_code = EXIT_STAGE1_FAILURE


@dataclass(frozen=True)
class FlagSet:
    """An entrypoint's flags: which are bools (the rest take a value)."""

    entrypoint: str
    bools: frozenset[str]
    values: frozenset[str]

    def parse(self, argv: list[str]) -> tuple[dict[str, list[str | bool]], list[str]]:
        """Every flag's values in order, and the positional arguments after the flags."""
        seen: dict[str, list[str | bool]] = {}
        i = 0
        while i < len(argv):
            word = argv[i]
            if word == "--":
                i += 1
                break
            if not word.startswith("-") or word == "-":
                break
            name, has_value, value = word.lstrip("-").partition("=")
            if word.startswith("---") or not name:
                raise Stage1Error(f"{self.entrypoint}: bad flag syntax: {word}")
            if name in self.bools:
                seen.setdefault(name, []).append(_parse_bool(self.entrypoint, name, value) if has_value else True)
            elif name in self.values:
                if not has_value:
                    if i + 1 >= len(argv):
                        raise Stage1Error(f"{self.entrypoint}: flag needs an argument: -{name}")
                    i += 1
                    value = argv[i]
                seen.setdefault(name, []).append(value)
            else:
                raise Stage1Error(f"{self.entrypoint}: flag provided but not defined: {word.split('=', 1)[0]}")
            i += 1
        return seen, argv[i:]


def _parse_bool(entrypoint: str, name: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Stage1Error(f"{entrypoint}: invalid boolean value {value!r} for -{name}")


def _last(seen: dict[str, list[str | bool]], name: str, default=None):
    return seen[name][-1] if name in seen else default


def parse_uuid(entrypoint: str, positional: list[str]) -> str:
    """The pod's UUID, the one positional argument of run, gc and stop."""
    if not positional:
        raise Stage1Error(f"{entrypoint}: the pod's UUID is missing")
    if len(positional) > 1:
        raise Stage1Error(f"{entrypoint}: one UUID expected after the flags, got {' '.join(positional)!r}")
    text = positional[0].lower()
    if len(text) == 32 and re.fullmatch(r"[0-9a-f]{32}", text):  # appc's UUID type takes it undashed too
        text = f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    if not _UUID.match(text):
        raise Stage1Error(f"{entrypoint}: {positional[0]!r} is not a UUID")
    return text


@dataclass(frozen=True)
class NetArg:
    """One network of `--net`: its name and the CNI_ARGS given to it (`name:K=V;K2=V2`)."""

    name: str
    args: str = ""


def parse_net(values: list[str]) -> list[NetArg]:
    """rkt's NetList: comma-separated names, each with optional `:ARGS`; every --net adds to it;
    a name may not repeat. Empty (no --net at all) means rkt's "default"."""
    nets: list[NetArg] = []
    for value in values:
        for item in value.split(","):
            name, _, args = item.partition(":")
            if not name:
                raise Stage1Error(f"run: --net={value}: a network name is empty")
            if item.count(":") > 1:
                raise Stage1Error(f"run: --net={value}: network {name!r} has malformed arguments")
            if args and name in ("all", "host", "none", "default"):
                raise Stage1Error(f"run: --net={value}: the special network {name!r} takes no arguments")
            if any(n.name == name for n in nets):
                raise Stage1Error(f"run: --net={value}: network {name!r} is given twice")
            nets.append(NetArg(name, args))
    return nets or [NetArg("default")]


def parse_dns_conf_mode(value: str | None) -> tuple[str, str]:
    """`--dns-conf-mode=resolv=MODE,hosts=MODE` (either key may be left out: default)."""
    modes = {"resolv": "default", "hosts": "default"}
    allowed = {"resolv": RESOLV_MODES, "hosts": HOSTS_MODES}
    for pair in (value.split(",") if value else []):
        key, sep, mode = pair.partition("=")
        if not sep or key not in allowed:
            raise Stage1Error(f"run: --dns-conf-mode={value}: {pair!r} is not resolv=MODE or hosts=MODE")
        if mode not in allowed[key]:
            raise Stage1Error(f"run: --dns-conf-mode={value}: {key} must be one of {', '.join(allowed[key])}")
        modes[key] = mode
    return modes["resolv"], modes["hosts"]


RUN_FLAGS = FlagSet("run", frozenset({"debug", "interactive", "mutable", "disable-capabilities-restriction",
                                      "disable-paths", "disable-seccomp"}),
                    frozenset({"net", "mds-token", "local-config", "private-users", "hostname", "dns-conf-mode"}))
ENTER_FLAGS = FlagSet("enter", frozenset(), frozenset({"pid", "appname"}))
GC_FLAGS = FlagSet("gc", frozenset({"debug"}), frozenset({"local-config"}))
STOP_FLAGS = FlagSet("stop", frozenset({"force"}), frozenset())

DEFAULT_LOCAL_CONFIG = "/etc/rkt"     # rkt's default --local-config
SYSTEM_CONFIG = "/usr/lib/rkt"        # rkt's system configuration directory (its net.d too)


@dataclass(frozen=True)
class RunArgs:
    uuid: str
    debug: bool = False
    nets: list[NetArg] = field(default_factory=lambda: [NetArg("default")])
    interactive: bool = False
    mds_token: str = ""
    local_config: str = DEFAULT_LOCAL_CONFIG
    private_users: str = ""
    hostname: str = ""
    mutable: bool = False
    disable_capabilities: bool = False
    disable_paths: bool = False
    disable_seccomp: bool = False
    resolv_mode: str = "default"
    hosts_mode: str = "default"


def parse_run(argv: list[str]) -> RunArgs:
    seen, positional = RUN_FLAGS.parse(argv)
    net_values = [str(v) for v in seen.get("net", [])]
    resolv, hosts = parse_dns_conf_mode(_last(seen, "dns-conf-mode"))
    return RunArgs(
        uuid=parse_uuid("run", positional),
        debug=bool(_last(seen, "debug", False)),
        nets=parse_net(net_values),
        interactive=bool(_last(seen, "interactive", False)),
        mds_token=str(_last(seen, "mds-token", "")),
        local_config=str(_last(seen, "local-config", DEFAULT_LOCAL_CONFIG)),
        private_users=str(_last(seen, "private-users", "")),
        hostname=str(_last(seen, "hostname", "")),
        mutable=bool(_last(seen, "mutable", False)),
        disable_capabilities=bool(_last(seen, "disable-capabilities-restriction", False)),
        disable_paths=bool(_last(seen, "disable-paths", False)),
        disable_seccomp=bool(_last(seen, "disable-seccomp", False)),
        resolv_mode=resolv,
        hosts_mode=hosts,
    )


@dataclass(frozen=True)
class EnterArgs:
    pid: int
    appname: str
    command: list[str]


def parse_enter(argv: list[str]) -> EnterArgs:
    """`--pid=PID --appname=NAME -- CMD [ARGS...]`: the command is everything after the flags."""
    seen, command = ENTER_FLAGS.parse(argv)
    pid_text = _last(seen, "pid")
    if pid_text is None:
        raise Stage1Error("enter: --pid is missing")
    if not str(pid_text).isdigit() or int(str(pid_text)) < 1:
        raise Stage1Error(f"enter: --pid={pid_text}: not a process id")
    appname = _last(seen, "appname")
    if not appname:
        raise Stage1Error("enter: --appname is missing")
    if not command:
        raise Stage1Error("enter: no command to run after --")
    return EnterArgs(int(str(pid_text)), str(appname), list(command))


@dataclass(frozen=True)
class GcArgs:
    uuid: str
    debug: bool = False
    local_config: str = DEFAULT_LOCAL_CONFIG


def parse_gc(argv: list[str]) -> GcArgs:
    seen, positional = GC_FLAGS.parse(argv)
    return GcArgs(parse_uuid("gc", positional), bool(_last(seen, "debug", False)),
                  str(_last(seen, "local-config", DEFAULT_LOCAL_CONFIG)))


@dataclass(frozen=True)
class StopArgs:
    uuid: str
    force: bool = False


def parse_stop(argv: list[str]) -> StopArgs:
    seen, positional = STOP_FLAGS.parse(argv)
    return StopArgs(parse_uuid("stop", positional), bool(_last(seen, "force", False)))
