"""The runtime's own log (`--log FILE --log-format text|json`), which containerd's shim and podman
read when a command fails. kvmpod-oci's own messages go there, never to the container's stdout and
stderr, which belong to the app byte for byte. json: one object a line, as runc writes them
({"level": …, "msg": …, "time": RFC 3339})."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TextIO


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        return json.dumps({"level": record.levelname.lower().replace("warning", "warn"),
                           "msg": record.getMessage(), "time": when})


def open_log(path: str | None, fmt: str) -> TextIO:
    """The log's stream: the file (appended, line-buffered), or stderr without --log."""
    if not path:
        return sys.stderr
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", buffering=1, encoding="utf-8", errors="replace")


def configure(stream: TextIO, fmt: str, debug: bool) -> None:
    """kvmpod's logging and one-line messages into `stream`."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("kvmpod-oci: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)   # its netlink chatter says nothing of the pod
