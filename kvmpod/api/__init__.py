"""The Python API: kvmpod.Pod, kvmpod.run() and what they return (docs/api.md). kvmpod/__init__.py hands
these names out lazily, so that `import kvmpod` (and the CLI's start) never pays for them."""

from kvmpod.api.pod import DEVNULL, PIPE, App, Pod, PodProcess, PodResult, run
from kvmpod.errors import AppExitError, KvmpodError, PodTimeout

__all__ = ["App", "AppExitError", "DEVNULL", "KvmpodError", "PIPE", "Pod", "PodProcess", "PodResult", "PodTimeout",
           "run"]
