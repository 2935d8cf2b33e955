"""What a pod is asked to be and do (RunOptions), set by every door into kvmpod: the CLI (kvmpod/cli/run.py),
the Python API (kvmpod/api/), rkt's stage1 (kvmpod/stage1/) and the OCI runtime (kvmpod/oci_runtime/).

Read by planning (launch.py), the runner (runner.py) and the hand-over record (handover.py); imports
nothing of the pod runtime itself, so every one of them can import it.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from kvmpod.image.manifest import Isolator
from kvmpod.image.transfer import Transfer
from kvmpod.net.spec import NetRequest
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.volumes import Volume

if TYPE_CHECKING:
    from kvmpod.agent.session import ExitStatus

STOP_TIMEOUT = 10.0     # seconds the apps get to end after SIGTERM (a signal or `kvmpod stop`) before SIGKILL


@dataclass
class RunOptions:
    memory_mib: int | None = None   # None: sized from the apps' resource isolators (pod/resources.py)
    cpus: int | None = None
    hostname: str | None = None     # default kvmpod-<first 8 of the UUID>
    annotations: dict[str, str] = field(default_factory=dict)   # the pod manifest's annotations
    pod_isolators: list[Isolator] = field(default_factory=list)  # --pod-manifest's; resource ones bound the apps
    uuid_file: str | None = None    # --uuid-file-save: the UUID is written here once the pod exists
    kernel: str | None = None
    accel: str = "auto"
    agent_transport: str = "auto"   # --agent-transport (kvmpod/vm/transport.py)
    boot: str | None = None         # --boot snapshot|cold; None: [run] boot (kvmpod/boot/snapshot.py)
    debug: bool = False
    interactive: bool = False
    keep: bool = False
    boot_timeout: float = 60.0
    pod_env: dict[str, str] = field(default_factory=dict)
    kernel_args: list[str] = field(default_factory=list)
    detach: bool = False    # app output to <pod dir>/logs/, the directory stays once the apps have started
    stop_timeout: float = STOP_TIMEOUT
    timeout: float | None = None    # --timeout: seconds the apps may run before the pod is stopped (docs/ci.md)
    on_started: Callable[[PodDir], None] | None = None   # called once every app runs (detach's report)
    volumes: list[Volume] = field(default_factory=list)  # --volume / the pod manifest's (pod/volumes.py)
    network: NetRequest = field(default_factory=NetRequest)  # --net, --port, --dns… (kvmpod/net/); default: none
    transfer: Transfer = Transfer()  # --insecure-options, --ca-file: how the pod's images may be fetched
    # where the apps' stdout and stderr go when not detached; None: this process's own fds 1 and 2. The
    # Python API's worker (kvmpod/api/worker.py) names them, its sys.stderr carrying kvmpod's messages.
    output_fds: tuple[int, int] | None = None
    # the apps' names and exit statuses once they are known, before teardown (rkt's status files)
    on_exited: Callable[[list[tuple[str, "ExitStatus"]]], None] | None = None
    # OCI create/start: boot the VM and get the apps ready, call on_created, then wait for a `start`
    # control request before starting them (kvmpod/oci_runtime/, docs/oci-runtime.md)
    hold_apps: bool = False
    on_created: Callable[[PodDir], None] | None = None
    # the pod's UUID when its caller chose it (rkt's stage0 does, kvmpod/stage1/); None: a new one
    pod_uuid: str | None = None
    # rkt's immutable pods: the first app to fail stops the others (SIGTERM, then SIGKILL after
    # stop_timeout), and its exit status is the pod's; otherwise the pod waits for every app
    stop_on_failure: bool = False
    # the VM backend (kvmpod/vm/libvirt_vm.py, docs/libvirt.md): None = [vm] backend in kvmpod.toml, else qemu;
    # libvirt_uri None = [vm] libvirt-uri, else qemu:///system as root, qemu:///session otherwise
    backend: str | None = None
    libvirt_uri: str | None = None


# what a pod's kvmpod process answers (docs/cli.md); blocked across the idle relay's execs (relay.py)
POD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def notice(message: str) -> None:
    print(f"kvmpod: notice: {message}", file=sys.stderr, flush=True)
