"""`kvmpod fetch` and `kvmpod image ...`: building, importing, listing, exporting and removing images."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from kvmpod.errors import EXIT_KVMPOD_FAILURE, KvmpodError, UsageError
from kvmpod.image.build import build_aci
from kvmpod.image.limits import human_size
from kvmpod.image.manifest import Port, build_manifest
from kvmpod.image.transfer import Transfer
from kvmpod.store import Store

SHORT_ID_HEX = 32   # as `rkt image list` prints them; any unique prefix of 12+ hex digits is accepted


def cmd_fetch(ns: argparse.Namespace) -> int:
    """Import each source and print its image ID (stdout: one ID per line, as rkt fetch does)."""

    store = Store(transfer=Transfer.from_flags(ns.insecure_options, ns.ca_file))
    for source in ns.sources:
        print(store.import_ref(source).id, flush=True)
    return 0


def cmd_image_list(ns: argparse.Namespace) -> int:
    records = Store().list_records()
    if ns.json:
        print(json.dumps([{"id": r.id, "name": r.name, "labels": r.labels, "imported": r.imported,
                           "size": r.size, "source": r.source, "signature": r.signature}
                          for r in records], indent=2))
        return 0
    rows = [(f"sha512-{r.hex[:SHORT_ID_HEX]}", r.name, r.labels.get("version", ""), human_size(r.size),
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.imported)), _short_signature(r.signature))
            for r in records]
    header = ("ID", "NAME", "VERSION", "SIZE", "IMPORTED", "SIGNATURE")
    if ns.no_legend:
        header_rows = rows
    else:
        header_rows = [header, *rows]
    widths = [max((len(row[i]) for row in [header, *rows]), default=0) for i in range(len(header))]
    for row in header_rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _short_signature(status: str) -> str:
    """`verified <40-hex fingerprint>` as `verified <key ID>` (its last 16 digits), like gpg prints it."""
    word, _, fingerprint = status.partition(" ")
    return f"{word} {fingerprint[-16:]}" if fingerprint else status


def cmd_image_cat_manifest(ns: argparse.Namespace) -> int:
    record = Store().find_text(ns.image)
    print(json.dumps(record.manifest, indent=2 if ns.pretty else None))
    return 0


def cmd_image_export(ns: argparse.Namespace) -> int:

    store = Store()
    store.export(store.find_text(ns.image), Path(ns.output), overwrite=ns.overwrite)
    return 0


def cmd_image_rm(ns: argparse.Namespace) -> int:
    """Remove each image; carry on past failures and report them (exit 125 if any failed)."""

    store = Store()
    failed = False
    for text in ns.images:
        try:
            record = store.find_text(text)
            store.remove(record)
        except KvmpodError as e:
            print(f"kvmpod: error: {e}", file=sys.stderr)
            failed = True
            continue
        print(f"removed {record.id}")
    return EXIT_KVMPOD_FAILURE if failed else 0


def cmd_image_gc(ns: argparse.Namespace) -> int:
    for what in Store().gc():
        print(f"removed {what}")
    return 0


def cmd_image_fsck(ns: argparse.Namespace) -> int:
    """One line per problem (stdout), the count on stderr; exit 1 while any is left (docs/store.md)."""
    from kvmpod.store.check import check, repair

    store = Store()
    problems = check(store)
    if ns.repair and problems:
        done, problems = repair(store, problems)
        for line in done:
            print(f"repaired: {line}", flush=True)
    for problem in problems:
        print(problem.line(), flush=True)
    if not problems:
        return 0
    fixable = sum(p.fix is not None for p in problems)
    hint = f" ({fixable} fixed by --repair)" if fixable and not ns.repair else ""
    print(f"kvmpod: error: image fsck: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the store "
          f"{store.root}{hint}", file=sys.stderr, flush=True)
    return 1


def cmd_image_help(ns: argparse.Namespace) -> int:
    """`kvmpod image` without a command."""
    ns.help_parser.print_help()
    return 2


def cmd_image_build(ns: argparse.Namespace) -> int:

    try:
        exec_ = shlex.split(ns.exec)
    except ValueError as e:
        raise UsageError(f"--exec: {e}") from e
    manifest = build_manifest(ns.name, exec_=exec_, user=ns.user, group=ns.group,
                              working_directory=ns.working_dir, environment=dict(ns.env),
                              labels=dict(ns.label), annotations=dict(ns.annotation),
                              ports=[_port(text) for text in ns.port])
    build_aci(Path(ns.rootfs), manifest, Path(ns.output), ns.compression)
    return 0


def _port(text: str):
    """--port NAME:PROTOCOL:PORT[:COUNT] of `image build` (the manifest's validation checks the rest)."""

    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(parts) or not all(x.isdigit() for x in parts[2:]):
        raise UsageError(f"--port {text}: expected NAME:PROTOCOL:PORT[:COUNT], e.g. http:tcp:80")
    return Port(parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else 1, False)
