"""Merging ordered layers of rootfs entries into one rootfs, and writing a rootfs as an ACI.

One engine for appc image dependencies (spec/aci.md: each dependency's rootfs laid down in order,
then the image's own, then its pathWhitelist) and for Docker/OCI layers with whiteouts
(image-spec layer.md). docs/oci.md describes the rules; in short, layer by layer:

* a later entry replaces an earlier one at the same path; a directory over a directory keeps the
  children and takes the new attributes; anything else over a directory drops its subtree;
* an entry whose parent in the merged tree is a symlink or not a directory is an ImageError: an
  entry is never written through a symlink (missing parents are implied: 0755, 0:0);
* whiteouts=True: `.wh.NAME` removes NAME and its subtree, `.wh..wh..opq` empties its directory,
  both only of what lower layers put there (a layer's whiteouts are applied before its entries);
  other `.wh..wh.*` names (aufs bookkeeping) are ignored; whiteouts never reach the result;
* hard links share their target's inode: when the target is later replaced or removed, the links
  keep the old data, and the first remaining name in the result becomes the FILE.

Entries are metadata only (file data is read lazily through `opener`), so the merged tree stays
in memory; the tars behind the openers must stay open until the result is written.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import tarfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from kvmpod.disk.entries import ROOT_PATH, EntryKind, RootfsEntry
from kvmpod.errors import DiskError, ImageError, KvmpodError
from kvmpod.image.manifest import parse_manifest

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_AUFS_META_PREFIX = ".wh..wh."

_ACI_ROOTFS = "rootfs"


@dataclass(frozen=True)
class Layer:
    """A layer's entries with the name its errors show (a file, a blob, an image name)."""

    name: str
    entries: Iterable[RootfsEntry]

    def __iter__(self) -> Iterator[RootfsEntry]:
        return iter(self.entries)


@dataclass(slots=True, eq=False)
class _Node:
    path: str
    kind: EntryKind  # FILE, DIR or SYMLINK: a hard link is a FILE node sharing its target's `entry`
    entry: RootfsEntry  # a FILE node's entry is its inode: data and attributes, shared by its links
    children: dict[str, _Node] | None = None  # DIR only, in order of first appearance


class _Tree:
    def __init__(self) -> None:
        self.root = _Node("", EntryKind.DIR, RootfsEntry(ROOT_PATH, EntryKind.DIR, 0o755, 0, 0, 0.0), {})
        self.root_set = False  # a layer gave the root its own attributes
        self.nodes: dict[str, _Node] = {}  # every path in the tree: its ancestors are all DIR nodes

    # -- whiteouts ------------------------------------------------------------------------------

    def whiteout(self, layer: str, e: RootfsEntry) -> bool:
        """Apply `e` if it is a whiteout (and say so); otherwise leave the tree alone."""
        parent, _, name = e.path.rpartition("/")
        if any(part.startswith(WHITEOUT_PREFIX) for part in parent.split("/")):
            raise ImageError(f"{layer}: /{e.path}: entries inside a whiteout are not allowed")
        if not name.startswith(WHITEOUT_PREFIX):
            return False
        if name == OPAQUE_WHITEOUT:
            # Paths are only in the tree through real directories: a symlinked parent is a no-op.
            node = self.nodes.get(parent) if parent else self.root
            if node is not None and node.kind is EntryKind.DIR:
                assert node.children is not None
                for child in node.children.values():
                    self._forget(child)
                node.children = {}
        elif not name.startswith(_AUFS_META_PREFIX):
            target = name[len(WHITEOUT_PREFIX):]
            node = self.nodes.get(f"{parent}/{target}" if parent else target)
            if node is not None:
                holder = self.nodes[parent] if parent else self.root
                assert holder.children is not None
                del holder.children[target]
                self._forget(node)
        return True

    def _forget(self, node: _Node) -> None:
        """Drop `node` and its subtree from the path index (the caller unlinks it from its parent)."""
        stack = [node]
        while stack:
            n = stack.pop()
            del self.nodes[n.path]
            if n.children:
                stack.extend(n.children.values())

    # -- entries --------------------------------------------------------------------------------

    def add(self, layer: str, e: RootfsEntry) -> None:
        if e.path == ROOT_PATH:
            if e.kind is not EntryKind.DIR:
                raise ImageError(f"{layer}: /: the rootfs root must be a directory")
            self.root.entry, self.root_set = e, True
            return
        parent = self._parent(layer, e)
        assert parent.children is not None
        name = e.path.rpartition("/")[2]
        old = parent.children.get(name)
        if e.kind is EntryKind.DIR:
            if old is not None and old.kind is EntryKind.DIR:
                old.entry = e
                return
            node = _Node(e.path, EntryKind.DIR, e, {})
        elif e.kind is EntryKind.HARDLINK:
            target = self.nodes.get(e.link_target)
            if target is None or target.kind is not EntryKind.FILE:
                raise ImageError(f"{layer}: /{e.path}: hard link target /{e.link_target} is not a regular file "
                                 "of this layer or a lower one")
            node = _Node(e.path, EntryKind.FILE, target.entry)
        else:
            node = _Node(e.path, e.kind, e)
        if old is not None:
            self._forget(old)
        parent.children[name] = node  # a replaced entry keeps its place among its siblings
        self.nodes[e.path] = node

    def _parent(self, layer: str, e: RootfsEntry) -> _Node:
        """The directory node `e` goes into; missing directories on the way are implied."""
        parent_path = e.path.rpartition("/")[0]
        if not parent_path:
            return self.root
        node = self.nodes.get(parent_path)
        if node is not None and node.kind is EntryKind.DIR:
            return node  # the fast path: every ancestor of a tree node is a directory
        node = self.root
        path = ""
        for part in parent_path.split("/"):
            path = f"{path}/{part}" if path else part
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                child = _Node(path, EntryKind.DIR, RootfsEntry(path, EntryKind.DIR, 0o755, 0, 0, e.mtime), {})
                node.children[part] = child
                self.nodes[path] = child
            elif child.kind is EntryKind.SYMLINK:
                raise ImageError(f"{layer}: /{e.path}: its parent /{path} is a symlink; "
                                 "entries may not be written through symlinks")
            elif child.kind is not EntryKind.DIR:
                raise ImageError(f"{layer}: /{e.path}: its parent /{path} is not a directory")
            node = child
        return node

    # -- the result -----------------------------------------------------------------------------

    def entries(self, keep: set[str] | None) -> list[RootfsEntry]:
        """The tree depth-first, parents before children; `keep` (if given) limits it to those paths."""
        out: list[RootfsEntry] = [self.root.entry] if self.root_set else []
        first_name: dict[int, str] = {}  # id(inode entry) -> the path it was written as a FILE at
        assert self.root.children is not None
        stack: list[Iterator[_Node]] = [iter(self.root.children.values())]
        while stack:
            node = next(stack[-1], None)
            if node is None:
                stack.pop()
                continue
            if keep is not None and node.path not in keep:
                continue
            e = node.entry
            if node.kind is EntryKind.FILE:
                data_path = first_name.setdefault(id(e), node.path)
                if data_path != node.path:
                    e = RootfsEntry(node.path, EntryKind.HARDLINK, e.mode, e.uid, e.gid, e.mtime,
                                    link_target=data_path)
            if e.path != node.path:
                e = dataclasses.replace(e, path=node.path)
            out.append(e)
            if node.children:
                stack.append(iter(node.children.values()))
        return out

    def kept_paths(self, whitelist: Collection[str]) -> set[str]:
        """The whitelisted paths the tree holds, and the directories that hold them."""
        keep: set[str] = set()
        for listed in whitelist:
            path = _whitelist_path(listed)
            if path not in self.nodes:
                continue
            while path and path not in keep:
                keep.add(path)
                path = path.rpartition("/")[0]
        return keep


def _whitelist_path(listed: str) -> str:
    """A pathWhitelist entry as a rootfs path ("/etc/x/" -> "etc/x"); the root is ""."""
    if not isinstance(listed, str) or not listed.startswith("/"):
        raise ImageError(f"pathWhitelist: {json.dumps(listed)} is not an absolute path")
    parts = [p for p in listed.split("/") if p and p != "."]
    if ".." in parts:
        raise ImageError(f"pathWhitelist: {json.dumps(listed)}: '..' components are not allowed")
    return "/".join(parts)


def merge_layers(layers: Iterable[Iterable[RootfsEntry]], *, whiteouts: bool = False,
                 path_whitelist: Collection[str] | None = None) -> list[RootfsEntry]:
    """The rootfs that `layers` (lowest first) make together, as entries build_iso and write_aci take.

    Each path appears once, parents before children (depth first, in order of first appearance),
    a HARDLINK after the FILE it names. A Layer's name prefixes its errors (others are "layer N").
    Read each tar of a layer with entries_from_tar(..., implied_dirs=False) so that directories the
    tar does not list keep their lower attributes (and lower_links=True for Docker/OCI layers).

    path_whitelist (spec/aci.md): if non-empty, keep only the listed absolute paths, plus the
    directories that hold them (with their merged attributes). As in appc's reference renderer, a
    listed directory keeps itself, not its contents: list every path that should remain.
    """
    tree = _Tree()
    for number, layer in enumerate(layers, 1):
        name = layer.name if isinstance(layer, Layer) else f"layer {number}"
        try:
            entries = list(layer)  # the whole layer is validated before any of it is merged
        except (ImageError, DiskError) as e:
            raise type(e)(f"{name}: {e}") from e
        if whiteouts:
            entries = [entry for entry in entries if not tree.whiteout(name, entry)]
        for entry in entries:
            tree.add(name, entry)
    return tree.entries(tree.kept_paths(path_whitelist) if path_whitelist else None)


def write_aci(entries: Iterable[RootfsEntry], manifest: dict, out: BinaryIO) -> None:
    """Write an uncompressed ACI to `out`: `manifest`, then `rootfs` and the entries under `rootfs/`.

    Deterministic: the same manifest and entries give the same bytes, so the same image ID (the
    sha512 of this tar). PAX format (long names, big ids, sub-second mtimes); owners are numeric
    (no user/group names), the manifest and an implied rootfs root get mtime 0; nothing comes from
    the clock or the host. `entries` must be in build_iso's order (merge_layers' result is). `out`
    is not closed.
    """
    data = json.dumps(manifest, indent=2).encode() + b"\n"
    parse_manifest(data)  # an ACI kvmpod writes is always valid
    # The tar is streamed to `out` ("w|"), which may be a pipe or a hashing writer.
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
        it = iter(entries)
        first = next(it, None)
        if first is None or first.path != ROOT_PATH:
            tar.addfile(_tar_info(_ACI_ROOTFS, EntryKind.DIR, 0o755, 0, 0, 0))
        for e in itertools.chain((first,) if first else (), it):
            if e.path == ROOT_PATH and e is not first:
                raise ImageError("/: the root directory's entry must come first")
            _add_entry(tar, e)


_TAR_TYPES = {EntryKind.FILE: tarfile.REGTYPE, EntryKind.DIR: tarfile.DIRTYPE,
              EntryKind.SYMLINK: tarfile.SYMTYPE, EntryKind.HARDLINK: tarfile.LNKTYPE}


def _tar_info(name: str, kind: EntryKind, mode: int, uid: int, gid: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = _TAR_TYPES[kind]
    info.mode = mode & 0o7777
    info.uid, info.gid = uid, gid
    # An integral float would become a needless PAX "mtime=123.0" record.
    info.mtime = int(mtime) if mtime == int(mtime) else mtime
    return info


def _add_entry(tar: tarfile.TarFile, e: RootfsEntry) -> None:
    if e.path != ROOT_PATH and (e.path.startswith("/") or {"", ".", ".."} & set(e.path.split("/"))):
        raise ImageError(f"/{e.path}: not a normalised rootfs-relative path")
    name = _ACI_ROOTFS if e.path == ROOT_PATH else f"{_ACI_ROOTFS}/{e.path}"
    info = _tar_info(name, e.kind, e.mode, e.uid, e.gid, e.mtime)
    if e.kind is EntryKind.SYMLINK:
        info.linkname = e.link_target
    elif e.kind is EntryKind.HARDLINK:
        info.linkname = f"{_ACI_ROOTFS}/{e.link_target}"
    if e.kind is not EntryKind.FILE or e.size == 0:
        tar.addfile(info)
        return
    if e.opener is None:
        raise DiskError(f"/{e.path}: file entry without data")
    info.size = e.size
    try:
        with e.opener() as data:
            tar.addfile(info, _Exact(data, e.size, e.path))
    except KvmpodError:
        raise
    except tarfile.TarError as err:
        raise ImageError(f"/{e.path}: cannot read the file data from the image: {err}") from err


class _Exact:
    """Hands tarfile exactly `size` bytes of a file's data, or a one-line error if it ends early."""

    def __init__(self, fp: BinaryIO, size: int, path: str):
        self._fp, self._left, self._path = fp, size, path

    def read(self, n: int = -1) -> bytes:
        want = self._left if n is None or n < 0 else min(n, self._left)
        try:
            chunk = self._fp.read(want) if want else b""
        except OSError as err:
            raise DiskError(f"/{self._path}: cannot read the file data: {err.strerror or err}") from err
        if len(chunk) != want:
            raise ImageError(f"/{self._path}: file data ended {self._left - len(chunk)} bytes early")
        self._left -= want
        return chunk
