"""Several kvmpod commands at once: one store, one disk per image, every pod correct, nothing half-written."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kvmpod.image.build import build_aci
from kvmpod.image.manifest import build_manifest
from tests.conftest import kvmpod_cmd

PODS = 4


def test_concurrent_runs_of_a_new_image(kvmpod_env, busybox_rootfs, tmp_path):
    aci = tmp_path / "fresh.aci"  # never run before: every pod races to import it and build its disk
    build_aci(busybox_rootfs, build_manifest("example.com/fresh", exec_=["/bin/sh", "-c", "echo pod $N"]), aci)
    procs = [subprocess.Popen(kvmpod_cmd("run", "--set-env", f"N={i}", str(aci)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=kvmpod_env) for i in range(PODS)]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    for i, (out, err, code) in enumerate(results):
        assert (code, out) == (0, f"pod {i}\n".encode()), err.decode()
    store = Path(kvmpod_env["KVMPOD_STORE_DIR"])
    assert list((store / "tmp").iterdir()) == []
    assert all(p.suffix == ".iso" for p in (store / "rootfs").iterdir()), list((store / "rootfs").iterdir())
