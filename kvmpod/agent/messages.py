# Generated from kvmpod/agent/protocol.toml by kvmpod/agent/gen_protocol.py. Do not edit: change the toml and run
# `make generate` (tests/unit/test_protocol.py fails when this file is stale).
"""The agent protocol's constants, enums and tlv messages (docs/agent-protocol.md, "Messages").

Each message is a dataclass: its fields by name (str fields are bytes), encode() for the payload,
decode(payload) for the message, both driven by its FIELDS table (kvmpod/agent/codec.py).
"""

from __future__ import annotations

import dataclasses
import enum

from kvmpod.agent.codec import FieldSpec, Message

VERSION = 1
MIN_VERSION = 1
HEADER_SIZE = 12
MAX_PAYLOAD = 262144
DATA_CHUNK = 65536
STDIN_WINDOW = 262144
MAX_STREAMS = 64
METADATA_DOC_MAX = 4194304
VSOCK_PORT = 1024


class MessageType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    START = 3
    STARTED = 4
    STDIN = 5
    STDIN_EOF = 6
    STDOUT = 7
    STDERR = 8
    WINDOW = 9
    SIGNAL = 10
    EXIT = 11
    ERROR = 12
    SHUTDOWN = 13
    LOG = 14
    RESIZE = 15
    METADATA = 16
    METADATA_START = 17
    NETWORK = 18
    PREPARE = 19
    PREPARED = 20
    THAW = 21


class Field(enum.IntEnum):
    PROTO_MIN = 1
    PROTO_MAX = 2
    PROTO_VERSION = 3
    AGENT_VERSION = 4
    BOOT_NS = 5
    APP_NAME = 10
    DISK_SERIAL = 11
    ARG = 12
    ENV = 13
    WORKDIR = 14
    USER = 15
    GROUP = 16
    SUPP_GID = 17
    START_FLAGS = 18
    PRE_START = 30
    POST_STOP = 31
    CAPS_RETAIN = 32
    CAPS_REMOVE = 33
    SECCOMP_RETAIN = 34
    SECCOMP_REMOVE = 35
    SECCOMP_ERRNO = 36
    TTY_ROWS = 37
    TTY_COLS = 38
    PID = 20
    BYTES = 21
    SIGNO = 22
    EXIT_CODE = 23
    TERM_SIGNAL = 24
    STAGE = 25
    ERRNO = 26
    MESSAGE = 27
    POD_UUID = 40
    METADATA_TOKEN = 41
    HMAC_KEY = 42
    METADATA_PORT = 43
    POD_MANIFEST = 44
    POD_ANNOTATIONS = 45
    IMAGE_ID = 46
    IMAGE_MANIFEST = 47
    APP_ANNOTATIONS = 48
    VOLUME_MOUNT = 49
    ROOT_TAG = 19
    RLIMIT = 50
    OOM_SCORE_ADJ = 51
    NET_INTERFACE = 60
    NET_ADDRESS = 61
    NET_ROUTE = 62
    DNS_NAMESERVER = 63
    DNS_SEARCH = 64
    DNS_OPTION = 65
    HOSTS_ENTRY = 66
    HOSTNAME = 67
    ENTROPY = 68
    REALTIME_NS = 69


class StartFlag(enum.IntFlag):
    STDIN = 1
    READONLY_ROOTFS = 2
    NO_NEW_PRIVS = 4
    TTY = 8
    ENTER = 16
    EXEC_PATH = 128
    SECCOMP_SKIP_UNKNOWN = 64
    KEEP_ETC = 32


@dataclasses.dataclass(frozen=True, slots=True)
class MessageSpec:
    sender: str    # host | guest
    stream: str    # zero | process | any
    payload: str   # tlv | raw | empty


MESSAGE_SPECS: dict[MessageType, MessageSpec] = {
    MessageType.HELLO: MessageSpec("guest", "zero", "tlv"),
    MessageType.HELLO_ACK: MessageSpec("host", "zero", "tlv"),
    MessageType.START: MessageSpec("host", "process", "tlv"),
    MessageType.STARTED: MessageSpec("guest", "process", "tlv"),
    MessageType.STDIN: MessageSpec("host", "process", "raw"),
    MessageType.STDIN_EOF: MessageSpec("host", "process", "empty"),
    MessageType.STDOUT: MessageSpec("guest", "process", "raw"),
    MessageType.STDERR: MessageSpec("guest", "process", "raw"),
    MessageType.WINDOW: MessageSpec("guest", "process", "tlv"),
    MessageType.SIGNAL: MessageSpec("host", "process", "tlv"),
    MessageType.EXIT: MessageSpec("guest", "process", "tlv"),
    MessageType.ERROR: MessageSpec("guest", "any", "tlv"),
    MessageType.SHUTDOWN: MessageSpec("host", "zero", "empty"),
    MessageType.LOG: MessageSpec("guest", "zero", "tlv"),
    MessageType.RESIZE: MessageSpec("host", "process", "tlv"),
    MessageType.METADATA: MessageSpec("host", "zero", "tlv"),
    MessageType.METADATA_START: MessageSpec("host", "zero", "tlv"),
    MessageType.NETWORK: MessageSpec("host", "zero", "tlv"),
    MessageType.PREPARE: MessageSpec("host", "zero", "tlv"),
    MessageType.PREPARED: MessageSpec("guest", "zero", "tlv"),
    MessageType.THAW: MessageSpec("host", "zero", "tlv"),
}

FIELD_TYPES: dict[Field, str] = {
    Field.PROTO_MIN: "u32",
    Field.PROTO_MAX: "u32",
    Field.PROTO_VERSION: "u32",
    Field.AGENT_VERSION: "str",
    Field.BOOT_NS: "u64",
    Field.APP_NAME: "str",
    Field.DISK_SERIAL: "str",
    Field.ARG: "str",
    Field.ENV: "str",
    Field.WORKDIR: "str",
    Field.USER: "str",
    Field.GROUP: "str",
    Field.SUPP_GID: "u32",
    Field.START_FLAGS: "u32",
    Field.PRE_START: "str",
    Field.POST_STOP: "str",
    Field.CAPS_RETAIN: "str",
    Field.CAPS_REMOVE: "str",
    Field.SECCOMP_RETAIN: "str",
    Field.SECCOMP_REMOVE: "str",
    Field.SECCOMP_ERRNO: "str",
    Field.TTY_ROWS: "u32",
    Field.TTY_COLS: "u32",
    Field.PID: "u32",
    Field.BYTES: "u32",
    Field.SIGNO: "u32",
    Field.EXIT_CODE: "i32",
    Field.TERM_SIGNAL: "u32",
    Field.STAGE: "str",
    Field.ERRNO: "u32",
    Field.MESSAGE: "str",
    Field.POD_UUID: "str",
    Field.METADATA_TOKEN: "str",
    Field.HMAC_KEY: "str",
    Field.METADATA_PORT: "u32",
    Field.POD_MANIFEST: "str",
    Field.POD_ANNOTATIONS: "str",
    Field.IMAGE_ID: "str",
    Field.IMAGE_MANIFEST: "str",
    Field.APP_ANNOTATIONS: "str",
    Field.VOLUME_MOUNT: "str",
    Field.ROOT_TAG: "str",
    Field.RLIMIT: "str",
    Field.OOM_SCORE_ADJ: "i32",
    Field.NET_INTERFACE: "str",
    Field.NET_ADDRESS: "str",
    Field.NET_ROUTE: "str",
    Field.DNS_NAMESERVER: "str",
    Field.DNS_SEARCH: "str",
    Field.DNS_OPTION: "str",
    Field.HOSTS_ENTRY: "str",
    Field.HOSTNAME: "str",
    Field.ENTROPY: "u64",
    Field.REALTIME_NS: "u64",
}


@dataclasses.dataclass(slots=True, kw_only=True)
class Hello(Message):
    """HELLO (guest -> host, stream 0): first frame the agent sends: the range of versions it speaks,
    its build, when it started.
    """

    TYPE = MessageType.HELLO
    FIELDS = (
        FieldSpec("proto_min", "PROTO_MIN", Field.PROTO_MIN, "u32", required=True),
        FieldSpec("proto_max", "PROTO_MAX", Field.PROTO_MAX, "u32", required=True),
        FieldSpec("agent_version", "AGENT_VERSION", Field.AGENT_VERSION, "str"),
        FieldSpec("boot_ns", "BOOT_NS", Field.BOOT_NS, "u64"),
    )

    # PROTO_MIN (u32, required): lowest protocol version the sender speaks
    proto_min: int

    # PROTO_MAX (u32, required): highest protocol version the sender speaks
    proto_max: int

    # AGENT_VERSION (str, optional): agent build version, for diagnostics
    agent_version: bytes | None = None

    # BOOT_NS (u64, optional): guest CLOCK_BOOTTIME when the agent started, in nanoseconds
    boot_ns: int | None = None


@dataclasses.dataclass(slots=True, kw_only=True)
class HelloAck(Message):
    """HELLO_ACK (host -> guest, stream 0): host's answer: the version it chose. Nothing else is sent
    by either side before it.
    """

    TYPE = MessageType.HELLO_ACK
    FIELDS = (
        FieldSpec("proto_version", "PROTO_VERSION", Field.PROTO_VERSION, "u32", required=True),
    )

    # PROTO_VERSION (u32, required): the version chosen by the host
    proto_version: int


@dataclasses.dataclass(slots=True, kw_only=True)
class Start(Message):
    """START (host -> guest, a process stream): start a process (absent WORKDIR, USER, GROUP: /, 0, 0;
    START_FLAGS: 0); at most one of CAPS_RETAIN and CAPS_REMOVE, of SECCOMP_RETAIN and
    SECCOMP_REMOVE.
    """

    TYPE = MessageType.START
    FIELDS = (
        FieldSpec("app_name", "APP_NAME", Field.APP_NAME, "str", required=True),
        FieldSpec("disk_serial", "DISK_SERIAL", Field.DISK_SERIAL, "str", required=True),
        FieldSpec("arg", "ARG", Field.ARG, "str", repeated=True),
        FieldSpec("env", "ENV", Field.ENV, "str", repeated=True),
        FieldSpec("workdir", "WORKDIR", Field.WORKDIR, "str"),
        FieldSpec("user", "USER", Field.USER, "str"),
        FieldSpec("group", "GROUP", Field.GROUP, "str"),
        FieldSpec("supp_gid", "SUPP_GID", Field.SUPP_GID, "u32", repeated=True),
        FieldSpec("start_flags", "START_FLAGS", Field.START_FLAGS, "u32"),
        FieldSpec("pre_start", "PRE_START", Field.PRE_START, "str", repeated=True),
        FieldSpec("post_stop", "POST_STOP", Field.POST_STOP, "str", repeated=True),
        FieldSpec("caps_retain", "CAPS_RETAIN", Field.CAPS_RETAIN, "str", repeated=True),
        FieldSpec("caps_remove", "CAPS_REMOVE", Field.CAPS_REMOVE, "str", repeated=True),
        FieldSpec("seccomp_retain", "SECCOMP_RETAIN", Field.SECCOMP_RETAIN, "str", repeated=True),
        FieldSpec("seccomp_remove", "SECCOMP_REMOVE", Field.SECCOMP_REMOVE, "str", repeated=True),
        FieldSpec("seccomp_errno", "SECCOMP_ERRNO", Field.SECCOMP_ERRNO, "str"),
        FieldSpec("tty_rows", "TTY_ROWS", Field.TTY_ROWS, "u32"),
        FieldSpec("tty_cols", "TTY_COLS", Field.TTY_COLS, "u32"),
        FieldSpec("volume_mount", "VOLUME_MOUNT", Field.VOLUME_MOUNT, "str", repeated=True),
        FieldSpec("root_tag", "ROOT_TAG", Field.ROOT_TAG, "str"),
        FieldSpec("rlimit", "RLIMIT", Field.RLIMIT, "str", repeated=True),
        FieldSpec("oom_score_adj", "OOM_SCORE_ADJ", Field.OOM_SCORE_ADJ, "i32"),
    )

    # APP_NAME (str, required): the app's name in the pod (an AC Name)
    app_name: bytes

    # DISK_SERIAL (str, required): virtio-blk serial of the read-only rootfs disk (ISO 9660 +
    # Rock Ridge) the app runs from
    disk_serial: bytes

    # ARG (str, repeated): argv element, repeated in order; the first is the absolute path
    # executed
    arg: list[bytes] = dataclasses.field(default_factory=list)

    # ENV (str, repeated): NAME=value, repeated; the complete environment (the host computes it)
    env: list[bytes] = dataclasses.field(default_factory=list)

    # WORKDIR (str, optional): absolute working directory inside the app's rootfs; must exist
    workdir: bytes | None = None

    # USER (str, optional): user: a number, or a name looked up in the app rootfs's /etc/passwd
    user: bytes | None = None

    # GROUP (str, optional): group: a number, or a name looked up in the app rootfs's /etc/group
    group: bytes | None = None

    # SUPP_GID (u32, repeated): supplementary group id, repeated
    supp_gid: list[int] = dataclasses.field(default_factory=list)

    # START_FLAGS (u32, optional): bit set of START_FLAG_* values
    start_flags: int | None = None

    # PRE_START (str, repeated): argv element of the app's pre-start event handler, repeated in
    # order; the first is an absolute path
    pre_start: list[bytes] = dataclasses.field(default_factory=list)

    # POST_STOP (str, repeated): argv element of the app's post-stop event handler, repeated in
    # order; the first is an absolute path
    post_stop: list[bytes] = dataclasses.field(default_factory=list)

    # CAPS_RETAIN (str, repeated): capability name (CAP_*) of os/linux/capabilities-retain-set,
    # repeated: the bounding set is exactly these
    caps_retain: list[bytes] = dataclasses.field(default_factory=list)

    # CAPS_REMOVE (str, repeated): capability name (CAP_*) of os/linux/capabilities-remove-set,
    # repeated: taken out of the appc default set
    caps_remove: list[bytes] = dataclasses.field(default_factory=list)

    # SECCOMP_RETAIN (str, repeated): syscall name (or @appc.io/all) of
    # os/linux/seccomp-retain-set, repeated: every other syscall is blocked
    seccomp_retain: list[bytes] = dataclasses.field(default_factory=list)

    # SECCOMP_REMOVE (str, repeated): syscall name (or @appc.io/empty) of
    # os/linux/seccomp-remove-set, repeated: these syscalls are blocked
    seccomp_remove: list[bytes] = dataclasses.field(default_factory=list)

    # SECCOMP_ERRNO (str, optional): errno name (EPERM, ENOTSUP...) a blocked syscall fails
    # with; absent or empty: SIGSYS kills the process
    seccomp_errno: bytes | None = None

    # TTY_ROWS (u32, optional): terminal height in rows (START with START_FLAG_TTY: the initial
    # size; RESIZE: the new one)
    tty_rows: int | None = None

    # TTY_COLS (u32, optional): terminal width in columns (START with START_FLAG_TTY: the
    # initial size; RESIZE: the new one)
    tty_cols: int | None = None

    # VOLUME_MOUNT (str, repeated): a volume mounted in the app's root, repeated:
    # NAME:KIND:OPTIONS:TARGET, KIND empty (OPTIONS mode=,uid=,gid=) or host (OPTIONS
    # tag=[,ro]); OPTIONS may end with ,file=FILE (TARGET is a file: the volume's file FILE is
    # bound onto it) and then ,bindro (read-only in this app)
    volume_mount: list[bytes] = dataclasses.field(default_factory=list)

    # ROOT_TAG (str, optional): the app's root is the virtio-fs share with this tag, used in
    # place (writes land on the host; no overlay); DISK_SERIAL carries the same tag
    root_tag: bytes | None = None

    # RLIMIT (str, repeated): a resource limit set before exec, repeated: RESOURCE SOFT HARD,
    # decimal (RESOURCE a Linux RLIMIT_* number; SOFT/HARD 18446744073709551615 = unlimited)
    rlimit: list[bytes] = dataclasses.field(default_factory=list)

    # OOM_SCORE_ADJ (i32, optional): the process's /proc/self/oom_score_adj (-1000..1000)
    oom_score_adj: int | None = None


@dataclasses.dataclass(slots=True, kw_only=True)
class Started(Message):
    """STARTED (guest -> host, a process stream): the process was exec'd (after its pre-start handler
    succeeded).
    """

    TYPE = MessageType.STARTED
    FIELDS = (
        FieldSpec("pid", "PID", Field.PID, "u32", required=True),
    )

    # PID (u32, required): guest pid of the started process
    pid: int


@dataclasses.dataclass(slots=True, kw_only=True)
class Window(Message):
    """WINDOW (guest -> host, a process stream): stdin bytes written to the process: the host may send
    that many more.
    """

    TYPE = MessageType.WINDOW
    FIELDS = (
        FieldSpec("bytes", "BYTES", Field.BYTES, "u32", required=True),
    )

    # BYTES (u32, required): number of stdin bytes the agent has written to the process (window
    # credit returned)
    bytes: int


@dataclasses.dataclass(slots=True, kw_only=True)
class Signal(Message):
    """SIGNAL (host -> guest, a process stream): deliver a signal to the process."""

    TYPE = MessageType.SIGNAL
    FIELDS = (
        FieldSpec("signo", "SIGNO", Field.SIGNO, "u32", required=True),
    )

    # SIGNO (u32, required): a Linux signal number
    signo: int


@dataclasses.dataclass(slots=True, kw_only=True)
class Exit(Message):
    """EXIT (guest -> host, a process stream): the process ended and its post-stop handler has run:
    exactly one of EXIT_CODE and TERM_SIGNAL (the process's own). Its last STDOUT/STDERR frames
    precede it; the stream is then closed.
    """

    TYPE = MessageType.EXIT
    FIELDS = (
        FieldSpec("exit_code", "EXIT_CODE", Field.EXIT_CODE, "i32"),
        FieldSpec("term_signal", "TERM_SIGNAL", Field.TERM_SIGNAL, "u32"),
    )

    # EXIT_CODE (i32, optional): exit status of a process that called exit (0-255)
    exit_code: int | None = None

    # TERM_SIGNAL (u32, optional): signal that terminated the process
    term_signal: int | None = None


@dataclasses.dataclass(slots=True, kw_only=True)
class Error(Message):
    """ERROR (guest -> host, any stream): on a process stream: the START failed (no EXIT follows). On
    stream 0: the agent cannot go on and powers off.
    """

    TYPE = MessageType.ERROR
    FIELDS = (
        FieldSpec("stage", "STAGE", Field.STAGE, "str", required=True),
        FieldSpec("errno", "ERRNO", Field.ERRNO, "u32"),
        FieldSpec("message", "MESSAGE", Field.MESSAGE, "str", required=True),
    )

    # STAGE (str, required): what failed: channel, module, mount, rootfs, user, group, workdir,
    # capabilities, seccomp, exec, pre-start, request, protocol, metadata, tty, hostname
    stage: bytes

    # ERRNO (u32, optional): errno value of the failure, when there is one
    errno: int | None = None

    # MESSAGE (str, required): human-readable text (one line)
    message: bytes


@dataclasses.dataclass(slots=True, kw_only=True)
class Log(Message):
    """LOG (guest -> host, stream 0): an agent diagnostic line, shown by kvmpod run --debug."""

    TYPE = MessageType.LOG
    FIELDS = (
        FieldSpec("message", "MESSAGE", Field.MESSAGE, "str", required=True),
    )

    # MESSAGE (str, required): human-readable text (one line)
    message: bytes


@dataclasses.dataclass(slots=True, kw_only=True)
class Resize(Message):
    """RESIZE (host -> guest, a process stream): the new size of the process's terminal (START_FLAG_TTY
    streams; ignored otherwise).
    """

    TYPE = MessageType.RESIZE
    FIELDS = (
        FieldSpec("tty_rows", "TTY_ROWS", Field.TTY_ROWS, "u32", required=True),
        FieldSpec("tty_cols", "TTY_COLS", Field.TTY_COLS, "u32", required=True),
    )

    # TTY_ROWS (u32, required): terminal height in rows (START with START_FLAG_TTY: the initial
    # size; RESIZE: the new one)
    tty_rows: int

    # TTY_COLS (u32, required): terminal width in columns (START with START_FLAG_TTY: the
    # initial size; RESIZE: the new one)
    tty_cols: int


@dataclasses.dataclass(slots=True, kw_only=True)
class Metadata(Message):
    """METADATA (host -> guest, stream 0): metadata service documents, before METADATA_START: the pod's
    (no APP_NAME), or one app's (APP_NAME); pieces append.
    """

    TYPE = MessageType.METADATA
    FIELDS = (
        FieldSpec("app_name", "APP_NAME", Field.APP_NAME, "str"),
        FieldSpec("pod_manifest", "POD_MANIFEST", Field.POD_MANIFEST, "str", repeated=True),
        FieldSpec("pod_annotations", "POD_ANNOTATIONS", Field.POD_ANNOTATIONS, "str", repeated=True),
        FieldSpec("image_id", "IMAGE_ID", Field.IMAGE_ID, "str", repeated=True),
        FieldSpec("image_manifest", "IMAGE_MANIFEST", Field.IMAGE_MANIFEST, "str", repeated=True),
        FieldSpec("app_annotations", "APP_ANNOTATIONS", Field.APP_ANNOTATIONS, "str", repeated=True),
    )

    # APP_NAME (str, optional): the app's name in the pod (an AC Name)
    app_name: bytes | None = None

    # POD_MANIFEST (str, repeated): a piece of /pod/manifest (METADATA without APP_NAME)
    pod_manifest: list[bytes] = dataclasses.field(default_factory=list)

    # POD_ANNOTATIONS (str, repeated): a piece of /pod/annotations (METADATA without APP_NAME)
    pod_annotations: list[bytes] = dataclasses.field(default_factory=list)

    # IMAGE_ID (str, repeated): a piece of /apps/APP_NAME/image/id (METADATA with APP_NAME)
    image_id: list[bytes] = dataclasses.field(default_factory=list)

    # IMAGE_MANIFEST (str, repeated): a piece of /apps/APP_NAME/image/manifest (METADATA with
    # APP_NAME)
    image_manifest: list[bytes] = dataclasses.field(default_factory=list)

    # APP_ANNOTATIONS (str, repeated): a piece of /apps/APP_NAME/annotations (METADATA with
    # APP_NAME)
    app_annotations: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True, kw_only=True)
class MetadataStart(Message):
    """METADATA_START (host -> guest, stream 0): serve the documents sent so far. Once, after the
    METADATA frames and before the first START.
    """

    TYPE = MessageType.METADATA_START
    FIELDS = (
        FieldSpec("pod_uuid", "POD_UUID", Field.POD_UUID, "str", required=True),
        FieldSpec("metadata_token", "METADATA_TOKEN", Field.METADATA_TOKEN, "str", required=True),
        FieldSpec("hmac_key", "HMAC_KEY", Field.HMAC_KEY, "str", required=True),
        FieldSpec("metadata_port", "METADATA_PORT", Field.METADATA_PORT, "u32", required=True),
    )

    # POD_UUID (str, required): the pod's UUID in canonical form (METADATA_START)
    pod_uuid: bytes

    # METADATA_TOKEN (str, required): the secret first path segment of AC_METADATA_URL: 16 to
    # 128 characters of [A-Za-z0-9_-]
    metadata_token: bytes

    # HMAC_KEY (str, required): the pod's HMAC-SHA512 key for /pod/hmac/sign and /verify, in
    # hex: 64 to 128 bytes
    hmac_key: bytes

    # METADATA_PORT (u32, required): the TCP port on 127.0.0.1 the agent serves AC_METADATA_URL
    # on
    metadata_port: int


@dataclasses.dataclass(slots=True, kw_only=True)
class Network(Message):
    """NETWORK (host -> guest, stream 0): the pod's network, at most once, before the first START:
    interfaces, addresses, routes (applied at once, in that order) and the DNS settings and hosts
    entries (written into each app's root as it is built).
    """

    TYPE = MessageType.NETWORK
    FIELDS = (
        FieldSpec("net_interface", "NET_INTERFACE", Field.NET_INTERFACE, "str", repeated=True),
        FieldSpec("net_address", "NET_ADDRESS", Field.NET_ADDRESS, "str", repeated=True),
        FieldSpec("net_route", "NET_ROUTE", Field.NET_ROUTE, "str", repeated=True),
        FieldSpec("dns_nameserver", "DNS_NAMESERVER", Field.DNS_NAMESERVER, "str", repeated=True),
        FieldSpec("dns_search", "DNS_SEARCH", Field.DNS_SEARCH, "str", repeated=True),
        FieldSpec("dns_option", "DNS_OPTION", Field.DNS_OPTION, "str", repeated=True),
        FieldSpec("hosts_entry", "HOSTS_ENTRY", Field.HOSTS_ENTRY, "str", repeated=True),
    )

    # NET_INTERFACE (str, repeated): a guest interface, repeated: MAC NAME MTU [DEVICE_MAC] (the
    # agent renames the virtio-net device with that MAC, or with DEVICE_MAC when given, to NAME,
    # and gives it MAC)
    net_interface: list[bytes] = dataclasses.field(default_factory=list)

    # NET_ADDRESS (str, repeated): an address, repeated: MAC ADDRESS/PREFIX (IPv4 or IPv6)
    net_address: list[bytes] = dataclasses.field(default_factory=list)

    # NET_ROUTE (str, repeated): a route, repeated: MAC DESTINATION/PREFIX [GATEWAY] (0.0.0.0/0
    # or ::/0 for the default route)
    net_route: list[bytes] = dataclasses.field(default_factory=list)

    # DNS_NAMESERVER (str, repeated): a nameserver for every app's /etc/resolv.conf, repeated;
    # with none and no DNS_SEARCH/DNS_OPTION, the images' own files stay
    dns_nameserver: list[bytes] = dataclasses.field(default_factory=list)

    # DNS_SEARCH (str, repeated): a search domain for /etc/resolv.conf, repeated
    dns_search: list[bytes] = dataclasses.field(default_factory=list)

    # DNS_OPTION (str, repeated): an options word for /etc/resolv.conf (e.g. ndots:2), repeated
    dns_option: list[bytes] = dataclasses.field(default_factory=list)

    # HOSTS_ENTRY (str, repeated): an /etc/hosts line, repeated: ADDRESS NAME [NAME...]; with
    # any, every app's /etc/hosts is written anew (localhost, the pod's hostname, these)
    hosts_entry: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True, kw_only=True)
class Prepare(Message):
    """PREPARE (host -> guest, stream 0): a boot snapshot is being made (docs/snapshot.md): the image
    disks to mount now, each with a spare writable app root. The agent answers PREPARED, then reads
    nothing but THAW.
    """

    TYPE = MessageType.PREPARE
    FIELDS = (
        FieldSpec("disk_serial", "DISK_SERIAL", Field.DISK_SERIAL, "str", repeated=True),
    )

    # DISK_SERIAL (str, repeated): virtio-blk serial of the read-only rootfs disk (ISO 9660 +
    # Rock Ridge) the app runs from
    disk_serial: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True, kw_only=True)
class Prepared(Message):
    """PREPARED (guest -> host, stream 0): PREPARE is done: the agent is idle, waiting for THAW; the
    host may stop the VM and save it.
    """

    TYPE = MessageType.PREPARED
    FIELDS = (
    )


@dataclasses.dataclass(slots=True, kw_only=True)
class Thaw(Message):
    """THAW (host -> guest, stream 0): the first frame a VM restored from a boot snapshot gets (at
    least 4 ENTROPY words). The agent applies it, then sends HELLO again and the handshake runs as
    after a cold boot.
    """

    TYPE = MessageType.THAW
    FIELDS = (
        FieldSpec("hostname", "HOSTNAME", Field.HOSTNAME, "str", required=True),
        FieldSpec("entropy", "ENTROPY", Field.ENTROPY, "u64", repeated=True),
        FieldSpec("realtime_ns", "REALTIME_NS", Field.REALTIME_NS, "u64", required=True),
    )

    # HOSTNAME (str, required): the pod's hostname (a cold boot gets it on the kernel command
    # line instead)
    hostname: bytes

    # ENTROPY (u64, repeated): 64 random bits from the host, repeated: mixed into the guest
    # kernel's pool, whose generator is then reseeded
    entropy: list[int] = dataclasses.field(default_factory=list)

    # REALTIME_NS (u64, required): the host's CLOCK_REALTIME in nanoseconds when it sent THAW:
    # the guest clock is set to it
    realtime_ns: int


MESSAGES: dict[MessageType, type[Message]] = {
    MessageType.HELLO: Hello,
    MessageType.HELLO_ACK: HelloAck,
    MessageType.START: Start,
    MessageType.STARTED: Started,
    MessageType.WINDOW: Window,
    MessageType.SIGNAL: Signal,
    MessageType.EXIT: Exit,
    MessageType.ERROR: Error,
    MessageType.LOG: Log,
    MessageType.RESIZE: Resize,
    MessageType.METADATA: Metadata,
    MessageType.METADATA_START: MetadataStart,
    MessageType.NETWORK: Network,
    MessageType.PREPARE: Prepare,
    MessageType.PREPARED: Prepared,
    MessageType.THAW: Thaw,
}

__all__ = [
    "VERSION", "MIN_VERSION", "HEADER_SIZE", "MAX_PAYLOAD", "DATA_CHUNK", "STDIN_WINDOW",
    "MAX_STREAMS", "METADATA_DOC_MAX", "VSOCK_PORT", "MessageType", "Field", "StartFlag",
    "MessageSpec", "MESSAGE_SPECS", "FIELD_TYPES", "MESSAGES", "Hello", "HelloAck", "Start",
    "Started", "Window", "Signal", "Exit", "Error", "Log", "Resize", "Metadata", "MetadataStart",
    "Network", "Prepare", "Prepared", "Thaw",
]
