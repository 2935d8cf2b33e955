"""Hostile archives (issue "Images", section "Hostile archives"), end to end through the store.

Every archive here goes through `Store.import_aci` (and a few through `kvmpod fetch`), and each test
checks the three promises: the import is refused with the right KvmpodError subclass, its message is
ONE line that names the image file and the offending member or field, and afterwards the store holds
nothing (no blob, record, disk, source stamp or temp file) and nothing changed outside it (a listing
of everything around the store, including a sentinel directory that the archives aim their
traversal paths at, is the same before and after).

No VM is booted; the whole file runs in seconds. What is covered elsewhere, at a lower level:
tests/unit/test_disk.py (entries_from_tar / build_iso refusals, file-size and name-length limits),
tests/unit/test_manifest.py (every manifest rule, random JSON), tests/unit/test_image_store.py
(compression detection, a first set of bad archives).

Device nodes and FIFOs: kvmpod refuses them (they are not kept as Rock Ridge nodes); the decision
and its reasons are in docs/disk.md ("Decisions"). Through the store the refusal is an ImageError
whose message is the disk builder's ("<member>: device nodes are not supported in the rootfs disk").
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvmpod.errors import ConfigError, ImageError, KvmpodError, ManifestError, printable
from kvmpod.image.limits import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_SIZE, ImportLimits
from kvmpod.image.manifest import MAX_MANIFEST_BYTES
from kvmpod.store import Store
from kvmpod.store.store import StoredImage

MANIFEST = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/hostile",
            "labels": [{"name": "os", "value": "linux"}, {"name": "arch", "value": "amd64"}],
            "app": {"exec": ["/bin/true"], "user": "0", "group": "0"}}
MANIFEST_BYTES = json.dumps(MANIFEST).encode()
BLOCK = 512

# ==================================================================================================
# Building archives: any member name, type, link name, owner, mode, mtime; raw PAX records; any
# compression; damage to the compressed stream.


@dataclass(frozen=True)
class Member:
    name: str                     # str; bytes that are not UTF-8 as surrogate escapes ("\udcff")
    type: bytes = tarfile.REGTYPE
    data: bytes = b""             # written (and counted in the header's size) for regular types only
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_600_000_000
    pax: tuple[tuple[bytes, bytes], ...] = ()  # raw PAX records, in an extended header before this one


def file(name: str, data: bytes = b"x", **kw) -> Member:
    return Member(name, tarfile.REGTYPE, data, **kw)


def directory(name: str, **kw) -> Member:
    return Member(name, tarfile.DIRTYPE, mode=kw.pop("mode", 0o755), **kw)


def symlink(name: str, target: str, **kw) -> Member:
    return Member(name, tarfile.SYMTYPE, linkname=target, mode=kw.pop("mode", 0o777), **kw)


def hardlink(name: str, target: str, **kw) -> Member:
    return Member(name, tarfile.LNKTYPE, linkname=target, **kw)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def pax_record(keyword: bytes, value: bytes) -> bytes:
    """One `"%d %s=%s\\n"` PAX record (the length counts itself)."""
    body = b" " + keyword + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax_header(records: tuple[tuple[bytes, bytes], ...]) -> bytes:
    data = b"".join(pax_record(k, v) for k, v in records)
    head = tarfile.TarInfo("././@PaxHeader")
    head.type, head.size = tarfile.XHDTYPE, len(data)
    return head.tobuf(tarfile.USTAR_FORMAT) + _pad(data)


def member_bytes(m: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    ti = tarfile.TarInfo(m.name)
    ti.type, ti.linkname, ti.mode, ti.uid, ti.gid, ti.mtime = m.type, m.linkname, m.mode, m.uid, m.gid, m.mtime
    ti.uname = ti.gname = ""
    regular = ti.isreg()
    ti.size = len(m.data) if regular else 0
    head = pax_header(m.pax) if m.pax else b""
    return head + ti.tobuf(fmt, "utf-8", "surrogateescape") + (_pad(m.data) if regular else b"")


def build_tar(members: list[Member] = (), *, manifest: bytes | None = MANIFEST_BYTES, rootfs_dir: bool = True,
              fmt: int = tarfile.PAX_FORMAT, end: bool = True) -> bytes:
    """An ACI tar: `manifest`, a `rootfs` directory, the members, the end-of-archive blocks."""
    parts = []
    if manifest is not None:
        parts.append(member_bytes(file("manifest", manifest), fmt))
    if rootfs_dir:
        parts.append(member_bytes(directory("rootfs"), fmt))
    parts += [member_bytes(m, fmt) for m in members]
    if end:
        parts.append(b"\0" * (2 * BLOCK))
    return b"".join(parts)


COMPRESSIONS = ["gzip", "bzip2", "xz", "zstd"]


def compress(raw: bytes, kind: str) -> bytes:
    if kind == "none":
        return raw
    if kind == "gzip":
        return gzip.compress(raw, mtime=0)
    if kind == "bzip2":
        return bz2.compress(raw)
    if kind == "xz":
        return lzma.compress(raw)
    if kind == "zstd":  # with a content checksum, as the zstd command line writes by default
        return zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    raise AssertionError(kind)


def truncated(data: bytes, keep: int) -> bytes:
    return data[:keep]


def corrupted(data: bytes, at: int, xor: int = 0x55) -> bytes:
    out = bytearray(data)
    out[at] ^= xor
    return bytes(out)


# ==================================================================================================
# The scene: a store, the archive next to it, a sentinel directory the traversal paths aim at, and a
# working directory inside tmp_path (relative writes would land there and show in the listing).


def listing(root: Path, skip: Path) -> dict[str, tuple]:
    """Everything under `root` except `skip`: path -> (kind, size, mtime) (files), kind (the rest)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            p = here / name
            st_ = p.lstat()
            rel = str(p.relative_to(root))
            out[rel] = ("file", st_.st_size, st_.st_mtime_ns) if p.is_file() and not p.is_symlink() else (
                "link" if p.is_symlink() else "dir",)
    return out


def store_files(store: Store) -> list[str]:
    """Every file in the store (temp files, blobs, records, disks, stamps, locks): [] after a refusal."""
    if not store.root.exists():
        return []
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if not p.is_dir())


def assert_nothing_half_written(store: Store) -> None:
    for d in (store.tmp, store.blobs, store.records, store.disks, store.sources):
        assert not d.exists() or [p.name for p in d.iterdir()] == [], (d, list(d.iterdir()))
    assert store_files(store) == []


@dataclass
class Scene:
    root: Path
    store: Store
    outside: Path          # the sentinel directory: archives aim absolute and '..' paths at it
    before: dict[str, tuple] = field(default_factory=dict)
    skip: Path | None = None

    def aci(self, content: bytes, name: str = "hostile.aci") -> Path:
        path = self.root / "in" / name
        path.write_bytes(content)
        return path

    def snapshot(self, store: Store | None = None) -> None:
        """List everything around `store` (the scene's own by default), to compare after the import."""
        self.skip = (store or self.store).root
        self.before = listing(self.root, self.skip)

    def assert_untouched(self) -> None:
        assert listing(self.root, self.skip) == self.before
        assert sorted(p.name for p in self.outside.iterdir()) == ["sentinel"]

    def refuse(self, content: bytes, error: type[KvmpodError] = ImageError, *needles: str,
               limits: ImportLimits | None = None, store: Store | None = None) -> str:
        """Import `content`: refused with `error`, one line naming the file and the needles, nothing left."""
        aci = self.aci(content)
        store = store or (Store(self.store.root, limits=limits) if limits else self.store)
        self.snapshot(store)
        with pytest.raises(KvmpodError) as info:
            store.import_aci(aci)
        exc = info.value
        message = str(exc)
        assert isinstance(exc, error), (type(exc), message)
        assert_one_line(message)
        assert message.startswith(f"{aci}: "), message
        for needle in needles:
            assert needle in message, (needle, message)
        assert_nothing_half_written(store)
        self.assert_untouched()
        return message


def assert_one_line(message: str) -> None:
    assert message and message == message.strip(), repr(message)
    for ch in message:  # no line breaks (nor anything a terminal would treat as one)
        assert ch not in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", repr(message)


@pytest.fixture
def scene(tmp_path, monkeypatch) -> Scene:
    for d in ("in", "outside", "cwd"):
        (tmp_path / d).mkdir()
    (tmp_path / "outside" / "sentinel").write_text("untouched\n")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no user config of this machine
    monkeypatch.delenv("KVMPOD_CONFIG", raising=False)
    return Scene(tmp_path, Store(tmp_path / "store", limits=ImportLimits()), tmp_path / "outside")


# ==================================================================================================
# Absolute paths


@pytest.mark.parametrize("make", [
    lambda out: file(f"{out}/abs-escape", b"pwned"),
    lambda out: directory(f"{out}/abs-dir"),
    lambda out: symlink(f"{out}/abs-link", "/etc/passwd"),
    lambda out: file("/rootfs/etc/passwd", b"x"),
    lambda out: file("//rootfs/etc/passwd", b"x"),
    lambda out: file("/manifest", b"{}"),
    lambda out: Member(f"{out}/abs-fifo", tarfile.FIFOTYPE),
], ids=["file", "dir", "symlink", "slash-rootfs", "double-slash", "slash-manifest", "fifo"])
def test_absolute_paths(scene, make):
    member = make(scene.outside)
    scene.refuse(build_tar([file("rootfs/ok", b"fine"), member]), ImageError, member.name, "absolute")


def test_absolute_path_in_a_gnu_long_name(scene):
    name = str(scene.outside) + "/" + "long" * 40 + "/abs-escape"
    scene.refuse(build_tar([file(name)], fmt=tarfile.GNU_FORMAT), ImageError, name, "absolute")


def test_absolute_path_hidden_in_a_pax_path_record(scene):
    """The ustar name looks harmless; the PAX `path` record, which wins, is absolute."""
    evil = f"{scene.outside}/pax-escape"
    scene.refuse(build_tar([file("rootfs/harmless", pax=((b"path", evil.encode()),))]), ImageError, evil, "absolute")


# ==================================================================================================
# '..' components


@pytest.mark.parametrize("name", [
    "rootfs/../../outside/dotdot-escape",
    "../outside/dotdot-escape",
    "rootfs/a/../../../outside/x",
    "./rootfs/../x",
    "rootfs/..",
    "rootfs/bin/..",
    "rootfs/a/b/../../../../../../../../../../../../etc/passwd",
])
@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_dotdot_components(scene, name, kind):
    member = {"file": file(name), "dir": directory(name), "symlink": symlink(name, "target")}[kind]
    scene.refuse(build_tar([member]), ImageError, name, "'..'")


def test_dotdot_hidden_in_a_pax_path_record(scene):
    evil = "rootfs/../../outside/pax-dotdot"
    scene.refuse(build_tar([file("rootfs/harmless", pax=((b"path", evil.encode()),))]), ImageError, evil, "'..'")


def test_a_symlink_target_with_dotdot_is_kept_verbatim_not_followed(scene):
    """Not hostile on its own: a symlink may point anywhere (it is resolved in the guest, in its rootfs)."""
    image = scene.store.import_aci(scene.aci(build_tar([symlink("rootfs/up", "../../../../outside/sentinel")])))
    with tarfile.open(image.blob) as tar:
        assert tar.getmember("rootfs/up").linkname == "../../../../outside/sentinel"
    assert (scene.outside / "sentinel").read_text() == "untouched\n"


# ==================================================================================================
# A symlink followed by a file written through it


@pytest.mark.parametrize("members, shown, parent", [
    ([symlink("rootfs/lib", "/etc"), file("rootfs/lib/shadow")], "rootfs/lib/shadow", "rootfs/lib"),
    ([symlink("rootfs/out", "{out}"), file("rootfs/out/through-link")], "rootfs/out/through-link", "rootfs/out"),
    ([symlink("rootfs/up", "../../../outside"), file("rootfs/up/x")], "rootfs/up/x", "rootfs/up"),
    ([directory("rootfs/a"), symlink("rootfs/a/b", "../.."), file("rootfs/a/b/c/d")], "rootfs/a/b/c/d", "rootfs/a/b"),
    ([symlink("rootfs/d", "/"), directory("rootfs/d/etc")], "rootfs/d/etc", "rootfs/d"),
    ([symlink("rootfs/d", "/"), symlink("rootfs/d/etc", "x")], "rootfs/d/etc", "rootfs/d"),
    ([file("rootfs/f"), symlink("rootfs/s", "/etc"), hardlink("rootfs/s/passwd", "rootfs/f")], "rootfs/s/passwd",
     "rootfs/s"),
    ([symlink("rootfs/s", "/etc"), file("./rootfs//s/./passwd")], "./rootfs//s/./passwd", "rootfs/s"),
], ids=["abs-target", "sentinel-target", "dotdot-target", "nested", "dir-through", "symlink-through",
        "hardlink-through", "spelled-oddly"])
def test_a_symlink_followed_by_a_file_written_through_it(scene, members, shown, parent):
    members = [replace(m, linkname=m.linkname.replace("{out}", str(scene.outside))) for m in members]
    scene.refuse(build_tar(members), ImageError, shown, parent, "symlink")


@pytest.mark.parametrize("members, shown", [
    ([symlink("rootfs/s", "/etc/passwd"), file("rootfs/s")], "rootfs/s"),        # overwrite the link itself
    ([symlink("rootfs/s", "/etc"), directory("rootfs/s")], "rootfs/s"),           # turn it into a directory
    ([symlink("rootfs/s", "/etc/passwd"), hardlink("rootfs/h", "rootfs/s")], "rootfs/h"),  # link to the link
])
def test_a_symlink_replaced_or_hard_linked_afterwards(scene, members, shown):
    scene.refuse(build_tar(members), ImageError, shown)


# ==================================================================================================
# Hard links pointing outside rootfs/


@pytest.mark.parametrize("target, why", [
    ("/etc/passwd", "absolute"),
    ("{out}/sentinel", "absolute"),
    ("../outside/sentinel", "'..'"),
    ("rootfs/../manifest", "'..'"),
    ("rootfs/../../outside/sentinel", "'..'"),
    ("etc/passwd", "outside rootfs/"),
    ("manifest", "outside rootfs/"),
    ("rootfs", "outside rootfs/"),
    ("./rootfs/", "outside rootfs/"),
    ("rootfsx/f", "outside rootfs/"),
    ("", "outside rootfs/"),
    ("rootfs/not-there", "not an earlier regular file"),
    ("rootfs/later", "not an earlier regular file"),
    ("rootfs/dir", "not an earlier regular file"),
])
def test_a_hard_link_pointing_outside_rootfs(scene, target, why):
    target = target.replace("{out}", str(scene.outside))
    members = [directory("rootfs/dir"), hardlink("rootfs/evil", target), file("rootfs/later")]
    scene.refuse(build_tar(members), ImageError, "rootfs/evil", target, why)


# ==================================================================================================
# Device nodes and FIFOs: refused (docs/disk.md, "Decisions")


@pytest.mark.parametrize("member, what", [
    (Member("rootfs/dev/sda", tarfile.BLKTYPE), "device nodes are not supported in the rootfs disk"),
    (Member("rootfs/dev/mem", tarfile.CHRTYPE), "device nodes are not supported in the rootfs disk"),
    (Member("rootfs/dev/null", tarfile.CHRTYPE, mode=0o666), "device nodes are not supported in the rootfs disk"),
    (Member("rootfs/run/pipe", tarfile.FIFOTYPE), "FIFOs are not supported in the rootfs disk"),
    (Member("rootfs/tmp/\udcffodd", tarfile.FIFOTYPE), "FIFOs are not supported in the rootfs disk"),
])
def test_device_nodes_and_fifos_are_refused_with_a_clear_message(scene, member, what):
    message = scene.refuse(build_tar([file("rootfs/ok"), member]), ImageError, what)
    assert message.endswith(f"{printable(member.name)}: {what}")  # a non-UTF-8 byte shows as \\xff


# ==================================================================================================
# Entries outside rootfs/


@pytest.mark.parametrize("member", [
    file("etc/passwd"),
    file("rootfsx/evil"),          # shares the prefix's characters, not the directory
    file("rootfs.d/evil"),
    file("manifest.d"),
    file("manifest/x"),
    file("./etc/cron.d/evil"),
    directory("var"),
    symlink("evil", "/"),
    symlink("outside", "{out}"),
    hardlink("alias", "manifest"),
    Member("dev-null", tarfile.CHRTYPE),
], ids=lambda m: m.name)
def test_entries_outside_rootfs(scene, member):
    member = replace(member, linkname=member.linkname.replace("{out}", str(scene.outside)))
    scene.refuse(build_tar([file("rootfs/ok"), member]), ImageError, member.name, "outside rootfs/")


@pytest.mark.parametrize("member, problem", [
    (symlink("rootfs", "/"), "the rootfs itself must be a directory"),
    (symlink("rootfs", "{out}"), "the rootfs itself must be a directory"),
    (file("rootfs", b"not a dir"), "the rootfs itself must be a directory"),
])
def test_the_rootfs_itself_must_be_a_directory(scene, member, problem):
    member = replace(member, linkname=member.linkname.replace("{out}", str(scene.outside)))
    scene.refuse(build_tar([member, file("rootfs/x")], rootfs_dir=False), ImageError, "rootfs: ", problem)


# ==================================================================================================
# A second manifest


@pytest.mark.parametrize("second, needles", [
    (file("manifest", MANIFEST_BYTES), ["manifest"]),
    (file("./manifest", MANIFEST_BYTES), ["manifest"]),
    (file("././manifest", MANIFEST_BYTES), ["././manifest", "duplicate"]),
    (file(".//manifest", MANIFEST_BYTES), ["manifest"]),
    (file("manifest", b'{"acKind": "ImageManifest"}'), ["manifest"]),
    (hardlink("manifest", "manifest"), ["manifest"]),
    (symlink("manifest", "/etc/passwd"), ["manifest"]),
    (directory("manifest"), ["manifest"]),
])
@pytest.mark.parametrize("where", ["after the rootfs", "before the rootfs"])
def test_a_second_manifest(scene, second, needles, where):
    members = [file("rootfs/a"), second] if where == "after the rootfs" else [second, file("rootfs/a")]
    scene.refuse(build_tar(members), ImageError, *needles)


# ==================================================================================================
# A truncated or corrupted compressed stream


def _payload() -> bytes:
    """An ACI whose compressed form spans several blocks of every compressor."""
    text = b"".join(b"line %d of some compressible text\n" % i for i in range(4000))
    return build_tar([file("rootfs/a.txt", text), file("rootfs/b.bin", hashlib.sha512(text).digest() * 200),
                      file("rootfs/c.txt", text[::-1])])


PAYLOAD = _payload()


@pytest.mark.parametrize("kind", COMPRESSIONS)
@pytest.mark.parametrize("damage", ["cut-in-half", "cut-last-byte", "cut-last-12-bytes", "cut-after-header",
                                    "corrupt-middle", "corrupt-near-end"])
def test_a_truncated_or_corrupted_compressed_stream(scene, kind, damage):
    data = compress(PAYLOAD, kind)
    damaged = {
        "cut-in-half": lambda: truncated(data, len(data) // 2),
        "cut-last-byte": lambda: truncated(data, len(data) - 1),
        "cut-last-12-bytes": lambda: truncated(data, len(data) - 12),
        "cut-after-header": lambda: truncated(data, 20),
        "corrupt-middle": lambda: corrupted(data, len(data) // 2),
        "corrupt-near-end": lambda: corrupted(data, len(data) - 10),
    }[damage]()
    scene.refuse(damaged, ImageError, "corrupt or truncated compressed stream")


def _zstd_block_ends(data: bytes) -> list[int]:
    """Offsets just after each block of a single zstd frame (RFC 8878 section 3.1.1)."""
    fhd = data[4]
    single_segment, fcs_flag, dict_flag = (fhd >> 5) & 1, fhd >> 6, fhd & 3
    pos = 5 + (0 if single_segment else 1) + [0, 1, 2, 4][dict_flag] + [int(single_segment), 2, 4, 8][fcs_flag]
    ends = []
    while True:
        header = int.from_bytes(data[pos:pos + 3], "little")
        last, block_type, size = header & 1, (header >> 1) & 3, header >> 3
        pos += 3 + (1 if block_type == 1 else size)
        ends.append(pos)
        if last:
            return ends


def test_a_zstd_stream_cut_where_a_tar_member_ends_is_refused(scene):
    """A zstd frame cut right after a block whose output ends on a member boundary: the tar that comes
    out looks complete (tarfile accepts a missing end-of-archive marker), so only the decompressor can
    tell that the stream stopped early."""
    noise = random.Random(1).randbytes  # incompressible: zstd writes raw blocks of exactly 128 KiB
    first = 256 * 1024 - len(build_tar(end=False)) - BLOCK  # rootfs/a's data ends at 256 KiB
    raw = build_tar([file("rootfs/a", noise(first)), file("rootfs/b-lost", noise(100_000))])
    data = compress(raw, "zstd")
    cut = next(end for end in _zstd_block_ends(data)
               if len(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data[:end])).read()) == 256 * 1024)
    scene.refuse(data[:cut], ImageError, "corrupt or truncated compressed stream")


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_concatenated_streams_are_one_image(scene, kind):
    """Not hostile: multi-member gzip (pigz), multi-stream bzip2/xz, multi-frame zstd are read whole."""
    raw = PAYLOAD
    image = scene.store.import_aci(scene.aci(compress(raw[:3000], kind) + compress(raw[3000:], kind)))
    assert image.id == "sha512-" + hashlib.sha512(raw).hexdigest()


# ==================================================================================================
# Non-UTF-8 and over-long manifests


@pytest.mark.parametrize("data", [
    b"\xff\xfe" + json.dumps(MANIFEST).encode("utf-16-le"),                        # UTF-16 with a BOM
    json.dumps({**MANIFEST, "name": "example.com/caf\xe9"}, ensure_ascii=False).encode("latin-1"),
    MANIFEST_BYTES.replace(b'"/bin/true"', b'"/bin/\xed\xa0\x80"'),                # an encoded surrogate
    MANIFEST_BYTES.replace(b'"/bin/true"', b'"/bin/\xc0\xaf"'),                    # an overlong '/'
    MANIFEST_BYTES[:-1] + b"\x80}",                                                # a stray continuation byte
], ids=["utf16", "latin1", "surrogate", "overlong", "continuation"])
def test_a_non_utf8_manifest(scene, data):
    message = scene.refuse(build_tar([file("rootfs/a")], manifest=data), ManifestError, "manifest: not valid UTF-8")
    assert message.endswith("manifest: not valid UTF-8")


def _padded_manifest(size: int) -> bytes:
    """A valid manifest of exactly `size` bytes (whitespace before the closing brace)."""
    return MANIFEST_BYTES[:-1] + b" " * (size - len(MANIFEST_BYTES)) + b"}"


def test_an_over_long_manifest(scene):
    data = _padded_manifest(MAX_MANIFEST_BYTES + 1)
    scene.refuse(build_tar([file("rootfs/a")], manifest=data), ImageError, "manifest: ",
                 f"{MAX_MANIFEST_BYTES + 1} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")


def test_a_manifest_of_exactly_the_limit_is_accepted(scene):
    image = scene.store.import_aci(scene.aci(build_tar([file("rootfs/a")],
                                                       manifest=_padded_manifest(MAX_MANIFEST_BYTES))))
    assert image.manifest.name == "example.com/hostile"


def test_a_manifest_whose_header_claims_gigabytes(scene):
    """Refused from its header: the data is never read (there is none)."""
    head = tarfile.TarInfo("manifest")
    head.size = 5 << 30
    scene.refuse(build_tar([file("rootfs/a")], manifest=None, end=False) + head.tobuf(tarfile.GNU_FORMAT),
                 ImageError)


# ==================================================================================================
# A manifest that is valid JSON with wrong types everywhere


WRONG_TYPES = {
    "acKind": 1, "acVersion": ["0.8.11"], "name": {"n": 1}, "labels": "os=linux",
    "app": ["/bin/true"], "annotations": 7, "dependencies": {"imageName": "x"}, "pathWhitelist": "/bin",
}


@pytest.mark.parametrize("manifest, line", [
    (WRONG_TYPES, "manifest: acKind: 1 is not a string"),
    ({**MANIFEST, "labels": {"os": "linux"}}, 'manifest: labels: {"os": "linux"} is not a list'),
    ({**MANIFEST, "app": {"exec": "/bin/sh", "user": 0, "group": 0}}, 'manifest: app.exec: "/bin/sh" is not a list'),
    ({**MANIFEST, "app": {**MANIFEST["app"], "environment": {"A": "1"}}},
     'manifest: app.environment: {"A": "1"} is not a list'),
    ({**MANIFEST, "app": {**MANIFEST["app"], "ports": [{"name": 1, "protocol": [], "port": "80"}]}},
     "manifest: app.ports[0].name: 1 is not a string"),
    ({**MANIFEST, "dependencies": [{"imageName": 5, "labels": "x", "size": "big"}]},
     "manifest: dependencies[0].imageName: 5 is not a string"),
    ([MANIFEST], "manifest: top level is not a JSON object"),
    ("ImageManifest", "manifest: top level is not a JSON object"),
    (None, "manifest: top level is not a JSON object"),
], ids=["everything", "labels", "app.exec", "environment", "ports", "dependencies", "list", "string", "null"])
def test_a_manifest_with_wrong_types_everywhere(scene, manifest, line):
    message = scene.refuse(build_tar([file("rootfs/a")], manifest=json.dumps(manifest).encode()), ManifestError)
    assert message == f"{scene.root / 'in' / 'hostile.aci'}: {line}"


def test_wrong_types_with_newlines_and_escapes_in_the_values_stay_one_line(scene):
    manifest = {**MANIFEST, "name": "line one\nkvmpod: fake second line\x1b[2J", "labels": "a\nb"}
    message = scene.refuse(build_tar([file("rootfs/a")], manifest=json.dumps(manifest).encode()), ManifestError,
                           "manifest: ")
    assert "\x1b" not in message


# ==================================================================================================
# Tar bombs: caps on the uncompressed size and on the entry count


def bomb(kind: str, expanded: int, chunk: int = 1 << 20) -> bytes:
    """A compressed ACI whose one file is `expanded` zero bytes: one compressed chunk, repeated
    (every supported compression reads concatenated streams as one), so it is cheap to build."""
    head = build_tar(manifest=MANIFEST_BYTES, end=False)
    ti = tarfile.TarInfo("rootfs/zeros")
    ti.size = expanded
    zeros = compress(b"\0" * chunk, kind)
    assert expanded % chunk == 0
    return (compress(head + ti.tobuf(tarfile.GNU_FORMAT), kind) + zeros * (expanded // chunk)
            + compress(b"\0" * (2 * BLOCK), kind))


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_a_tar_bomb_is_stopped_by_the_size_cap(scene, kind):
    data = bomb(kind, 64 << 20)
    assert len(data) < 4 << 20
    message = scene.refuse(data, ImageError, "uncompressed image exceeds the 1.0 MiB limit",
                           "raise [image] max-size in kvmpod.toml", limits=ImportLimits(max_size=1 << 20))
    assert message.startswith(f"{scene.root / 'in' / 'hostile.aci'}: ")


def test_an_uncompressed_tar_is_capped_too(scene):
    scene.refuse(build_tar([file("rootfs/big", b"\0" * (300 << 10))]), ImageError, "exceeds the 256.0 KiB limit",
                 limits=ImportLimits(max_size=256 << 10))


def _write_config(scene: Scene, monkeypatch, text: str) -> Path:
    config = scene.root / "kvmpod.toml"
    config.write_text(text)
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    return config


def test_the_size_cap_comes_from_kvmpod_toml(scene, monkeypatch):
    _write_config(scene, monkeypatch, '[image]\nmax-size = "1M"\n')
    store = Store(scene.root / "store")  # no limits given: [image] in the config files
    assert store.limits == ImportLimits(max_size=1 << 20)
    scene.refuse(bomb("gzip", 8 << 20), ImageError, "exceeds the 1.0 MiB limit", "max-size", store=store)


def test_an_image_of_exactly_the_size_cap_is_accepted(scene):
    raw = build_tar([file("rootfs/a", b"y" * 5000)])
    image = Store(scene.root / "store", limits=ImportLimits(max_size=len(raw))).import_aci(
        scene.aci(compress(raw, "gzip")))
    assert image.blob.stat().st_size == len(raw)
    smaller = Store(scene.root / "store2", limits=ImportLimits(max_size=len(raw) - 1))
    scene.refuse(compress(raw, "gzip"), ImageError, "exceeds", store=smaller)


def _many(n: int) -> list[Member]:
    return [file(f"rootfs/f{i}", b"") for i in range(n)]


def test_too_many_entries_is_refused(scene):
    scene.refuse(compress(build_tar(_many(50)), "gzip"), ImageError, "more than 10 entries",
                 "raise [image] max-entries in kvmpod.toml", limits=ImportLimits(max_entries=10))


def test_the_entry_cap_comes_from_kvmpod_toml(scene, monkeypatch):
    _write_config(scene, monkeypatch, "[image]\nmax-entries = 20\n")
    store = Store(scene.root / "store")
    assert store.limits == ImportLimits(max_entries=20)
    scene.refuse(build_tar(_many(21)), ImageError, "more than 20 entries", "max-entries", store=store)


def test_an_image_with_exactly_the_entry_cap_is_accepted(scene):
    """The rootfs directory and 19 files: 20 entries (the manifest is not one)."""
    Store(scene.root / "store", limits=ImportLimits(max_entries=20)).import_aci(scene.aci(build_tar(_many(19))))


def test_the_entry_cap_stops_the_importer_reading_headers(scene, monkeypatch):
    """A tar of many tiny headers is a bomb too (tarfile keeps every header it reads in memory). With
    max-entries = 10 the importer must not read the 20,000 headers behind the cap: not in the
    manifest scan, not in the rootfs check."""
    headers = 20_000
    data = compress(build_tar(_many(headers)), "gzip")
    read = 0
    original = tarfile.TarInfo.fromtarfile.__func__

    def counting(cls, tar):
        nonlocal read
        read += 1
        return original(cls, tar)

    monkeypatch.setattr(tarfile.TarInfo, "fromtarfile", classmethod(counting))
    scene.refuse(data, ImageError, "more than 10 entries", limits=ImportLimits(max_entries=10))
    assert read < 100, f"{read} tar headers parsed for an entry cap of 10"


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.GNUTYPE_SPARSE])
def test_sparse_members_cannot_expand_past_the_size_cap(scene, kind):
    """GNU sparse files (PAX 0.1 map + realsize) carry one byte of data each and unpack to 64 MiB of
    zeros: the size cap must hold for what the rootfs disk will contain, not only for the tar bytes
    (found while writing this suite: 8 of them, 485 bytes gzipped, built a 512 MiB ISO)."""
    sparse = ((b"GNU.sparse.map", b"0,1"), (b"GNU.sparse.realsize", str(64 << 20).encode()))
    members = [Member(f"rootfs/sparse{i}", kind, b"x", pax=sparse) for i in range(8)]
    data = compress(build_tar(members), "gzip")
    assert len(data) < 1000
    scene.refuse(data, ImageError, "max-size", limits=ImportLimits(max_size=1 << 20))


def test_a_path_deeper_than_linux_can_open_is_refused_at_import(scene):
    """One member named rootfs/a/a/.../f, 4,000 levels and 8 KB deep (PATH_MAX is 4096): its implied
    directories make the importer's memory quadratic in the depth and the disk builder's time worse
    (found while writing this suite: 5,000 levels took 21 s to build, 20,000 levels 484 s and 2.3 GB,
    from a 437-byte archive). The guest could not open such a path anyway."""
    name = "rootfs/" + "a/" * 4000 + "f"
    data = compress(build_tar([file(name)]), "gzip")
    assert len(data) < 1000
    scene.refuse(data, ImageError)


def test_the_default_caps_are_sensible(scene):
    limits = ImportLimits()
    assert (limits.max_size, limits.max_entries) == (DEFAULT_MAX_SIZE, DEFAULT_MAX_ENTRIES)
    assert 4 << 30 <= limits.max_size <= 64 << 30      # room for CUDA/ML images, not for a disk-filling bomb
    assert 100_000 <= limits.max_entries <= 10_000_000  # a full distribution is ~100k files
    assert ImportLimits.from_config() == limits         # no config file: the defaults
    assert Store(scene.root / "store").limits == limits


@pytest.mark.parametrize("text, key", [
    ('[image]\nmax-size = "lots"\n', "max-size"),
    ("[image]\nmax-size = 0\n", "max-size"),
    ("[image]\nmax-entries = -1\n", "max-entries"),
    ('[image]\nmax-entries = "10"\n', "max-entries"),
    ("image = 3\n", "[image]"),
])
def test_a_bad_cap_in_kvmpod_toml_is_a_one_line_config_error(scene, monkeypatch, text, key):
    config = _write_config(scene, monkeypatch, text)
    with pytest.raises(ConfigError) as info:
        Store(scene.root / "store").import_aci(scene.aci(build_tar([file("rootfs/a")])))
    assert_one_line(str(info.value))
    assert key in str(info.value) and str(config) in str(info.value)
    assert store_files(Store(scene.root / "store")) == []


# ==================================================================================================
# Names that would break the one-line promise (found while writing this suite)


@pytest.mark.parametrize("member", [
    file("rootfs/../x\nkvmpod: error: a forged second line"),
    Member("rootfs/dev/x\ny", tarfile.CHRTYPE),
    hardlink("rootfs/h", "../x\ny"),
    file("etc/\rpasswd"),
], ids=["dotdot", "device", "hardlink-target", "outside"])
def test_control_characters_in_member_names_do_not_break_the_message_into_lines(scene, member):
    scene.refuse(build_tar([member]), ImageError)


# ==================================================================================================
# Hostile PAX headers (found while writing this suite: tarfile raises ValueError on some)


@pytest.mark.parametrize("records", [
    ((b"GNU.sparse.map", b"x,y"),),
    ((b"GNU.sparse.size", b"abc"),),
    ((b"GNU.sparse.realsize", b"abc"),),
    ((b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")),
    ((b"hdrcharset", b"\xff\xfe"),),
    ((b"size", b"9" * 30),),
], ids=["sparse-map", "sparse-size", "sparse-realsize", "sparse-1.0", "hdrcharset", "size-overflow"])
def test_malformed_pax_headers_are_image_errors(scene, records):
    scene.refuse(build_tar([file("rootfs/a", pax=records)]), ImageError)


@pytest.mark.parametrize("mtime", [b"nan", b"inf", b"-inf", b"1e400"])
def test_a_non_finite_mtime_is_refused_at_import(scene, mtime):
    scene.refuse(build_tar([file("rootfs/a", pax=((b"mtime", mtime),))]), ImageError, "rootfs/a: mtime",
                 "is not a finite time")


# ==================================================================================================
# The same refusals through `kvmpod fetch`


def kvmpod_fetch(scene: Scene, aci: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KVMPOD_CONFIG", "KVMPOD_STORE_DIR")}
    env["XDG_CONFIG_HOME"] = str(scene.root / "xdg")
    if config is not None:
        env["KVMPOD_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "kvmpod", "--dir", str(scene.store.root), "fetch", str(aci)],
                          capture_output=True, text=True, env=env, timeout=60)


CLI_CASES = {
    "absolute": (lambda out: build_tar([file(f"{out}/cli-escape")]), "absolute"),
    "dotdot": (lambda out: build_tar([file("rootfs/../../outside/cli-escape")]), "'..'"),
    "through-symlink": (lambda out: build_tar([symlink("rootfs/s", str(out)), file("rootfs/s/x")]), "symlink"),
    "fifo": (lambda out: compress(build_tar([Member("rootfs/p", tarfile.FIFOTYPE)]), "xz"), "FIFOs"),
    "second-manifest": (lambda out: build_tar([file("rootfs/a"), file("manifest", MANIFEST_BYTES)]), "manifest: duplicate entry"),
    "corrupt-gzip": (lambda out: corrupted(compress(PAYLOAD, "gzip"), 4000), "corrupt or truncated"),
    "wrong-types": (lambda out: build_tar([file("rootfs/a")], manifest=json.dumps(WRONG_TYPES).encode()),
                    "manifest: acKind: 1 is not a string"),
    "non-utf8": (lambda out: build_tar([file("rootfs/a")], manifest=b"\xff" + MANIFEST_BYTES), "not valid UTF-8"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_kvmpod_fetch_refuses_with_one_line_and_exit_125(scene, case):
    make, needle = CLI_CASES[case]
    aci = scene.aci(make(scene.outside))
    scene.snapshot()
    result = kvmpod_fetch(scene, aci)
    assert (result.returncode, result.stdout) == (125, "")
    assert result.stderr.startswith(f"kvmpod: error: {aci}: ") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr and "internal error" not in result.stderr
    assert_nothing_half_written(scene.store)
    scene.assert_untouched()


def test_kvmpod_fetch_refuses_a_tar_bomb_with_the_cap_from_kvmpod_toml(scene):
    config = scene.root / "kvmpod.toml"
    config.write_text('[image]\nmax-size = "1M"\nmax-entries = 1000\n')
    aci = scene.aci(bomb("gzip", 32 << 20))
    scene.snapshot()
    result = kvmpod_fetch(scene, aci, config)
    assert (result.returncode, result.stdout) == (125, "")
    assert result.stderr == (f"kvmpod: error: {aci}: uncompressed image exceeds the 1.0 MiB limit (a tar bomb?); "
                             "if it is genuine, raise [image] max-size in kvmpod.toml\n")
    assert_nothing_half_written(scene.store)
    scene.assert_untouched()
    config.write_text("[image]\nmax-entries = 5\n")
    result = kvmpod_fetch(scene, scene.aci(build_tar(_many(10)), "many.aci"), config)
    assert result.returncode == 125 and result.stderr.count("\n") == 1
    assert "more than 5 entries" in result.stderr and "max-entries" in result.stderr
    assert_nothing_half_written(scene.store)


def test_kvmpod_fetch_still_imports_a_good_image(scene):
    aci = scene.aci(compress(build_tar([file("rootfs/a")]), "zstd"), "good.aci")
    result = kvmpod_fetch(scene, aci)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == "sha512-" + hashlib.sha512(build_tar([file("rootfs/a")])).hexdigest() + "\n"


# ==================================================================================================
# Property-based: random tar members never make the importer fail with anything but a KvmpodError,
# and a refused import leaves nothing behind.

ESCAPE = str(Path(tempfile.gettempdir()) / "kvmpod-hostile-escape")  # absolute names aim here; never created
SMALL_LIMITS = ImportLimits(max_size=1 << 20, max_entries=64)

_SEGMENT = st.one_of(
    st.sampled_from(["rootfs", "manifest", ".", "..", "", "a", "b", "bin", "etc", "dev", "rootfs.d", "x" * 120,
                     "\udcff\udc80", "caf\u00e9", "\n", " ", "-", "\u202e", "\x7f"]),
    st.text(st.characters(min_codepoint=1, exclude_categories=("Cs",), exclude_characters="/"), max_size=6),
)
_NAME = st.one_of(
    st.lists(_SEGMENT, min_size=1, max_size=5).map("/".join),                             # anything
    st.lists(_SEGMENT, max_size=4).map(lambda p: "/".join(["rootfs", *p])),               # mostly inside
    st.lists(_SEGMENT, max_size=4).map(lambda p: "./" + "/".join(["rootfs", *p])),
    st.lists(_SEGMENT, max_size=3).map(lambda p: "/".join([ESCAPE, *p])),                 # absolute
    st.integers(1, 30).map(lambda n: "rootfs/" + "/".join(["d" * 200] * n)),              # very long
    st.just("manifest"),
)
_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                          tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE,
                          tarfile.GNUTYPE_SPARSE, b"V", b"M", b"Z"])
_IDS = st.one_of(st.sampled_from([0, 1, 65534, 2**31 - 1, 2**32 - 1, 2**32]), st.integers(-(2**20), 2**40))


@st.composite
def _members(draw, names=_NAME, types=_TYPES, pax=st.just(())) -> Member:
    return Member(
        name=draw(names), type=draw(types),
        data=draw(st.one_of(st.just(b""), st.binary(max_size=700))),
        linkname=draw(st.one_of(st.just(""), names, st.sampled_from(["rootfs/a", "rootfs/b", "manifest", "/"]))),
        mode=draw(st.one_of(st.sampled_from([0o644, 0o755, 0o4755, 0o7777, 0]), st.integers(0, 0o7777777))),
        uid=draw(_IDS), gid=draw(_IDS),
        mtime=draw(st.one_of(st.integers(-(2**40), 2**40), st.floats(-1e11, 1e11))),
        pax=draw(pax),
    )


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
_MANIFEST = st.one_of(
    st.just(MANIFEST_BYTES), st.just(MANIFEST_BYTES),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(sorted(MANIFEST)), _JSON, max_size=5)   # a valid manifest, some fields random
    .map(lambda d: json.dumps({**MANIFEST, **d}).encode()),
    st.binary(max_size=100),
    st.none(),
)


@dataclass(frozen=True)
class Archive:
    """What a property test imports; built from this (readable) description when the test runs."""
    members: tuple[Member, ...] = ()
    manifest: bytes | None = MANIFEST_BYTES
    rootfs_dir: bool = True
    fmt: int = tarfile.PAX_FORMAT
    end: bool = True
    compression: str = "none"
    keep: float | None = None   # truncate the compressed stream to this fraction of its length

    def build(self) -> bytes:
        raw = build_tar(list(self.members), manifest=self.manifest, rootfs_dir=self.rootfs_dir, fmt=self.fmt,
                        end=self.end)
        data = compress(raw, self.compression)
        return data if self.keep is None else truncated(data, int(len(data) * self.keep))


def _archives(members) -> st.SearchStrategy[Archive]:
    return st.builds(Archive, members=st.lists(members, max_size=8).map(tuple), manifest=_MANIFEST,
                     rootfs_dir=st.booleans(), fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
                     end=st.booleans(), compression=st.sampled_from(["none", *COMPRESSIONS]),
                     keep=st.none() | st.floats(0, 1))


def _import_only_raises_kvmpod_errors(content: bytes, base: Path, disk: bool = False) -> StoredImage | None:
    """Import `content` into a fresh store under `base`: a KvmpodError (one line, store empty) or an image."""
    with tempfile.TemporaryDirectory(dir=base) as d:
        root = Path(d)
        aci = root / "in.aci"
        aci.write_bytes(content)
        store = Store(root / "store", limits=SMALL_LIMITS)
        before = listing(base, root / "store")
        image = None
        try:
            image = store.import_aci(aci)
        except KvmpodError as e:
            assert_one_line(str(e))
            assert_nothing_half_written(store)
        else:
            assert image.id == "sha512-" + hashlib.sha512(image.blob.read_bytes()).hexdigest()
            assert [p.name for p in store.tmp.iterdir()] == []
            if disk:
                try:
                    iso = store.rootfs_disk(image)
                except KvmpodError as e:
                    assert_one_line(str(e))
                    assert [p.name for p in store.disks.iterdir()] == []
                else:
                    assert iso.is_file() and iso.stat().st_size > 0
                assert [p.name for p in store.tmp.iterdir()] == []
        assert listing(base, root / "store") == before
        assert not os.path.lexists(ESCAPE)
        return image


_PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])


@_PROPERTY
@given(archive=_archives(_members()))
def test_random_members_only_ever_raise_kvmpod_errors(tmp_path, monkeypatch, archive):
    monkeypatch.chdir(tmp_path)
    _import_only_raises_kvmpod_errors(archive.build(), tmp_path)


_PAX_KEYWORDS = st.sampled_from([b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"atime", b"uname",
                                 b"hdrcharset", b"comment", b"GNU.sparse.map", b"GNU.sparse.size",
                                 b"GNU.sparse.realsize", b"GNU.sparse.major", b"GNU.sparse.minor",
                                 b"GNU.sparse.name", b"GNU.sparse.offset", b"GNU.sparse.numbytes", b"SCHILY.xattr.x"])
_PAX_VALUES = st.one_of(
    st.sampled_from([b"", b"0", b"1", b"-1", b"nan", b"inf", b"1e400", b"9" * 30, b"0,1", b"x,y", b"BINARY",
                     b"rootfs/../x", ESCAPE.encode(), b"rootfs/a", b"manifest", b"\xff\xfe"]),
    st.binary(max_size=24),
)


@settings(_PROPERTY, max_examples=80)
@given(archive=_archives(_members(pax=st.lists(st.tuples(_PAX_KEYWORDS, _PAX_VALUES), min_size=1, max_size=3)
                                  .map(tuple))))
@example(archive=Archive((file("rootfs/a", pax=((b"GNU.sparse.map", b"x,y"),)),)))
def test_random_pax_records_only_ever_raise_kvmpod_errors(tmp_path, monkeypatch, archive):
    monkeypatch.chdir(tmp_path)
    _import_only_raises_kvmpod_errors(archive.build(), tmp_path)


@settings(_PROPERTY, max_examples=80)
@given(base_members=st.lists(_members(), max_size=4),
       patches=st.lists(st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=12)), min_size=1, max_size=6))
def test_random_header_bytes_only_ever_raise_kvmpod_errors(tmp_path, monkeypatch, base_members, patches):
    """A well-formed archive with bytes overwritten anywhere in its first blocks (headers, checksums...)."""
    monkeypatch.chdir(tmp_path)
    raw = bytearray(build_tar(base_members))
    for at, patch in patches:
        at %= len(raw)
        raw[at:at + len(patch)] = patch
    _import_only_raises_kvmpod_errors(bytes(raw), tmp_path)


_INSIDE = st.lists(st.sampled_from(["a", "b", "bin", "etc", "\udcff", "caf\u00e9", "n" * 60, "x y"]), min_size=1,
                   max_size=3).map(lambda p: "rootfs/" + "/".join(p))
_MTIME_RECORDS = st.one_of(st.just(()), st.tuples(st.tuples(st.just(b"mtime"), st.one_of(
    st.sampled_from([b"nan", b"inf", b"-inf", b"1e300", b"-1e300", b"253402300800"]),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode())))))


@settings(_PROPERTY, max_examples=50)
@given(members=st.lists(_members(names=_INSIDE, types=st.sampled_from(
    [tarfile.REGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
    pax=_MTIME_RECORDS), max_size=6))
@example(members=[file("rootfs/a", pax=((b"mtime", b"nan"),))])
def test_an_imported_image_builds_its_rootfs_disk_or_raises_a_kvmpod_error(tmp_path, monkeypatch, members):
    monkeypatch.chdir(tmp_path)
    content = build_tar([replace(m, linkname=m.linkname or "rootfs/a") for m in members])
    _import_only_raises_kvmpod_errors(content, tmp_path, disk=True)
