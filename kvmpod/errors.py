"""kvmpod's exception hierarchy and the exit codes the CLI maps them to.

Every error kvmpod raises on purpose is a KvmpodError whose str() is one line that names
the problem and the offending path or field. The CLI prints it as `kvmpod: error: ...`.
"""

from __future__ import annotations

# Exit codes of `kvmpod run` (documented in docs/cli.md), podman's convention:
EXIT_TIMEOUT = 124          # --timeout ran out: the pod was stopped (GNU timeout's status, which CI knows)
EXIT_KVMPOD_FAILURE = 125   # kvmpod itself failed (bad input, VM did not start, guest died)
EXIT_CANNOT_INVOKE = 126    # the app's exec path exists but could not be executed
EXIT_NOT_FOUND = 127        # the app's exec path does not exist in its rootfs
EXIT_SIGNAL_BASE = 128      # the app was killed by signal N: 128 + N


def printable(text: str) -> str:
    """Untrusted text (a tar member name, a link target) made safe for a one-line message: control
    characters become \\xNN escapes, so a hostile name can neither break the line nor forge a second
    `kvmpod: error:` line or drive the terminal."""
    if text.isprintable():  # the common case, and the hot one: every tar member's name passes here
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogate escape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


class KvmpodError(Exception):
    """Base of every error kvmpod reports to the user."""

    exit_code = EXIT_KVMPOD_FAILURE


class UsageError(KvmpodError):
    """The command line is wrong."""


class ConfigError(KvmpodError):
    """A kvmpod.toml config file is unreadable or holds a bad value."""


class ImageError(KvmpodError):
    """An image is missing, malformed or unsafe."""


class PolicyError(ImageError):
    """The signature policy refuses an image (kvmpod/image/signature.py admit(); docs/store.md)."""


class ManifestError(ImageError):
    """An image or pod manifest breaks the appc spec."""


class DiskError(KvmpodError):
    """A rootfs cannot be packed into a disk image."""


class KernelError(KvmpodError):
    """No usable guest kernel or initrd."""


class VMError(KvmpodError):
    """QEMU could not be started, or the VM died."""


class QemuBuildError(KvmpodError):
    """kvmpod's own QEMU build (kvmpod/vm/qemu_build.py) failed."""


class GuestPanic(VMError):
    """The guest kernel panicked."""


class GuestFault(VMError):
    """The guest broke a device kvmpod emulates itself (the userspace vsock backend): it is cut off."""


class NetworkError(KvmpodError):
    """A pod network cannot be set up: a tap, the bridge, an address, a port, a CNI plugin."""


class AgentError(KvmpodError):
    """The guest agent reported a failure or stopped answering."""


class ProtocolError(AgentError):
    """The guest sent something that breaks the agent protocol (the guest is untrusted)."""


class AppStartError(AgentError):
    """The agent could not start an app (missing exec path, working directory, user...)."""

    def __init__(self, message: str, exit_code: int = EXIT_KVMPOD_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KvmpodError):
    """The user stopped the pod (a second SIGINT/SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunTimeout(KvmpodError):
    """`kvmpod run --timeout`: the apps ran longer, and the pod was stopped (docs/ci.md)."""

    exit_code = EXIT_TIMEOUT


class PodTimeout(KvmpodError):
    """The Python API's timeout (kvmpod/api) ran out: the pod was stopped (docs/api.md)."""

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result    # the api.PodResult: output so far, the exit status the stop gave


class AppExitError(KvmpodError):
    """The Python API's check=True: an app ended with a non-zero exit status (docs/api.md)."""

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result
        self.exit_code = getattr(result, "exit_code", EXIT_KVMPOD_FAILURE)
