"""`make stage1`: build/kvmpod-stage1.aci, the stage1 ACI rkt runs pods with
(`rkt run --stage1-path=build/kvmpod-stage1.aci ...`).

The ACI holds no kernel, QEMU or Python of its own: its entrypoints are four small shell scripts that
exec the kvmpod installation that built the ACI (its Python interpreter, recorded in the scripts and
in the `kvmpod/stage1-python` annotation), which brings its kernel, initrd, agent and QEMU as for
`kvmpod run`. If that installation is gone, every entrypoint says so in one line and exits 254.
docs/stage1.md has the reasons and what it means for rkt users.

    rootfs/kvmpod/{run,enter,gc,stop}   the entrypoints (coreos.com/rkt/stage1/* annotations)
    rootfs/rkt/status/                  where the apps' exit statuses go (stage0 expects it when it
                                        renders the stage1 with overlayfs)

    python -m kvmpod.stage1.build -o build/kvmpod-stage1.aci [--python PATH]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shlex
import sys
import tarfile
from pathlib import Path

from kvmpod.version import __version__
from kvmpod.fsutil import write_atomically
from kvmpod.image.manifest import AC_VERSION

NAME = "kvmpod/stage1"
INTERFACE_VERSION = 5   # the guide's arguments up to --dns-conf-mode (4) and gc --local-config (5)
ENTRYPOINT_DIR = "kvmpod"
ENTRYPOINTS = ("run", "enter", "gc", "stop")
MTIME = 0   # the same installation builds the same ACI, byte for byte


def manifest(python: str) -> dict:
    annotations = [{"name": f"coreos.com/rkt/stage1/{e}", "value": f"/{ENTRYPOINT_DIR}/{e}"} for e in ENTRYPOINTS]
    annotations += [{"name": "coreos.com/rkt/stage1/interface-version", "value": str(INTERFACE_VERSION)},
                    {"name": "kvmpod/stage1-python", "value": python}]
    return {"acKind": "ImageManifest", "acVersion": AC_VERSION, "name": NAME,
            "labels": [{"name": "version", "value": __version__}, {"name": "os", "value": "linux"},
                       {"name": "arch", "value": "amd64"}],
            "annotations": annotations}


def entrypoint_script(entrypoint: str, python: str) -> str:
    py = shlex.quote(python)
    return f"""#!/bin/sh
# kvmpod's stage1 {entrypoint} entrypoint (rkt's stage1 ABI; docs/stage1.md), made by `make stage1`:
# it runs the kvmpod installation that built this ACI.
py={py}
if [ ! -x "$py" ]; then
    echo "kvmpod-stage1: error: $py: the kvmpod installation this stage1 was built with is gone (rebuild the ACI with make stage1)" >&2
    exit 254
fi
exec "$py" -m kvmpod.stage1 {entrypoint} "$@"
"""


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
    return info


def _file(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, MTIME
    tar.addfile(info, io.BytesIO(data))


def build_aci(python: str) -> bytes:
    """The ACI (a gzipped tar: manifest first, then rootfs/), owners root, times fixed."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _file(tar, "manifest", (json.dumps(manifest(python), indent=2) + "\n").encode(), 0o644)
        for directory in ("rootfs", f"rootfs/{ENTRYPOINT_DIR}", "rootfs/rkt", "rootfs/rkt/status"):
            tar.addfile(_dir(directory))
        for entrypoint in ENTRYPOINTS:
            _file(tar, f"rootfs/{ENTRYPOINT_DIR}/{entrypoint}", entrypoint_script(entrypoint, python).encode(), 0o755)
    return gzip.compress(raw.getvalue(), mtime=MTIME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmpod.stage1.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.aci")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter the entrypoints exec (default: this one, i.e. this installation)")
    ns = parser.parse_args(argv)
    python = str(Path(ns.python).absolute())  # not resolved: a venv's python is a symlink to the system's
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(ns.output, build_aci(python), mode=0o644)
    print(ns.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
