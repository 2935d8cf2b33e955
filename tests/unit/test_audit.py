"""The audit log: JSON lines, append-only, whole lines even with concurrent writers."""

from __future__ import annotations

import json
import multiprocessing

from kvmpod.pod import audit


def _writer(path: str, n: int) -> None:
    import os
    os.environ["KVMPOD_AUDIT_LOG"] = path
    for i in range(n):
        audit.pod_ended(f"uuid-{os.getpid()}-{i}", "exited", [{"name": "x" * 3000, "exit_code": i}])


def test_records_are_whole_json_lines_even_from_concurrent_writers(tmp_path, monkeypatch):
    log = tmp_path / "audit" / "audit.log"
    monkeypatch.setenv("KVMPOD_AUDIT_LOG", str(log))
    audit.pod_started("u1", [{"name": "web", "image": "sha512-ab", "image_name": "example.com/web",
                              "signature": "unsigned"}])
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(log), 50)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: nothing interleaved
    assert len(records) == 1 + 4 * 50
    start = records[0]
    assert start["event"] == "start" and start["uuid"] == "u1" and start["user"]["uid"] == 0
    assert start["apps"][0]["image"] == "sha512-ab" and start["host"]
    assert (log.stat().st_mode & 0o777) == 0o600
