"""The Python API without a VM: options checked in the caller's process (the CLI's parsers, its errors),
the names kvmpod/__init__.py hands out lazily, and what `import kvmpod` and `kvmpod --help` do not import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kvmpod
from kvmpod import errors
from kvmpod.pod.volumes import Volume


def test_options_become_the_clis_run_options():
    pod = kvmpod.Pod([kvmpod.App("a.aci", exec="/bin/sh", args=["-c", "true"], env={"A": "1"}, name="one",
                                 mounts=["volume=data,target=/data"]), "b.aci"],
                     memory="1G", cpus=2, hostname="h", annotations={"x": "y"}, volumes=["data,kind=empty"],
                     net="user", ports=["http:8080"], env={"P": "2"}, boot="cold", kernel_args=["quiet"],
                     stop_timeout=3)
    first, second = pod.apps
    assert (first.image, first.exec, first.args, first.env, first.name) == ("a.aci", "/bin/sh", ["-c", "true"],
                                                                             {"A": "1"}, "one")
    assert first.mounts[0].volume == "data" and second.image == "b.aci" and second.args is None
    o = pod.options
    assert (o.memory_mib, o.cpus, o.hostname, o.annotations, o.pod_env, o.boot, o.kernel_args, o.stop_timeout) == \
        (1024, 2, "h", {"x": "y"}, {"P": "2"}, "cold", ["quiet"], 3)
    assert isinstance(o.volumes[0], Volume) and o.volumes[0].name == "data"
    assert o.network.mode == "user" and o.network.ports[0].host_port == 8080


@pytest.mark.parametrize("kwargs, error, message", [
    ({"memory": "lots"}, errors.UsageError, "memory: 'lots' is not a memory size"),
    ({"cpus": 0}, errors.UsageError, "cpus=0 must be a whole number"),
    ({"accel": "xen"}, errors.UsageError, "accel='xen' is not one of auto, kvm, tcg"),
    ({"boot": "warm"}, errors.UsageError, "boot='warm' is not one of"),
    ({"net": "none", "ports": ["http:8080"]}, errors.UsageError, "--port needs a network"),
    ({"volumes": ["data,kind=nfs"]}, errors.KvmpodError, "--volume"),
])
def test_bad_options_raise_before_anything_runs(kwargs, error, message):
    with pytest.raises(error, match=message):
        kvmpod.Pod("a.aci", **kwargs)


def test_pod_shapes_that_cannot_run():
    with pytest.raises(errors.UsageError, match="at least one app"):
        kvmpod.Pod([])
    with pytest.raises(errors.UsageError, match="exactly one app"):
        kvmpod.Pod(["a.aci", "b.aci"]).start(stdin=kvmpod.PIPE)
    with pytest.raises(errors.UsageError, match="exec and arguments go into each App"):
        kvmpod.run(["a.aci", "b.aci"], "-c", "x")


def test_lazy_names():
    assert kvmpod.Pod.__module__ == "kvmpod.api.pod"
    assert kvmpod.ImageError is errors.ImageError and kvmpod.PodTimeout is errors.PodTimeout
    assert issubclass(kvmpod.AppExitError, kvmpod.KvmpodError)
    assert {"Pod", "run", "App", "PodResult"} <= set(dir(kvmpod))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        kvmpod.Nope  # noqa: B018


def test_import_and_help_stay_light():
    code = ("import sys, runpy, contextlib, io\n"
            "import kvmpod\n"
            "assert 'kvmpod.api' not in sys.modules\n"
            "sys.argv = ['kvmpod', '--help']\n"
            "from kvmpod.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main()\n"
            "heavy = [m for m in ('kvmpod.api', 'kvmpod.provision', 'kvmpod.completion', 'kvmpod.resources', "
            "'asyncio', 'rich', 'jsonschema') if m in sys.modules]\n"
            "print(heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
