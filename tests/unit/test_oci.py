"""Docker/OCI images converted to ACIs: archives the tests build themselves, then a real buildah image.

The hand-built sources cover the three formats, compressions, whiteouts and hard links across
layers, digest checks and hostile names; they need no tools and run in about a second. The last
tests convert a busybox image buildah builds FROM scratch (tests/oci_images.py), skipped with the
reason when buildah cannot run here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard

from kvmpod.disk.entries import entries_from_tar
from kvmpod.disk.iso import build_iso
from kvmpod.errors import DiskError, ImageError
from kvmpod.image.limits import ImportLimits
from kvmpod.image.manifest import parse_manifest
from kvmpod.image.oci import OciReference, convert, parse_reference
from tests.oci_images import BUSYBOX_CONFIG, GREETING, IMAGE

T = 1_600_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {"none": "application/vnd.oci.image.layer.v1.tar", "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


# --------------------------------------------------------------------------------------------------
# Building sources


def layer(*members: tuple) -> bytes:
    """An uncompressed layer tar: (name, type, data or link target[, mode[, uid]])."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra, *attrs in members:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime = kind, T
            ti.mode = attrs[0] if attrs else (0o755 if kind == tarfile.DIRTYPE else 0o644)
            ti.uid = attrs[1] if len(attrs) > 1 else 0
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = extra
            elif kind == tarfile.REGTYPE:
                ti.size = len(extra)
            tar.addfile(ti, io.BytesIO(extra) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def F(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0) -> tuple:
    return (name, tarfile.REGTYPE, data, mode, uid)


def D(name: str, mode: int = 0o755) -> tuple:
    return (name, tarfile.DIRTYPE, None, mode)


def L(name: str, target: str) -> tuple:
    return (name, tarfile.SYMTYPE, target, 0o777)


def H(name: str, target: str) -> tuple:
    return (name, tarfile.LNKTYPE, target)


BUSYBOX_LAYER = layer(D("bin"), F("bin/busybox", b"#!busybox", 0o755), L("bin/sh", "busybox"), D("etc"),
                      F("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65533::/:/bin/false\n"),
                      F("etc/hostname", b"base\n"), D("var"), D("var/cache"), F("var/cache/junk", b"junk"))
APP_LAYER = layer(F("etc/hostname", b"app\n"), F("var/.wh.cache"), D("srv"), F("srv/app", b"app", 0o755))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def image_config(config: dict[str, Any] | None, layers: list[bytes], **top: Any) -> dict[str, Any]:
    return {"architecture": "amd64", "os": "linux", **top, "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]}}


@dataclass
class Layout:
    """An OCI image layout: blobs by name, and index.json's descriptors."""

    files: dict[str, bytes] = field(default_factory=lambda: {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}'})
    manifests: list[dict[str, Any]] = field(default_factory=list)

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        self.files[f"blobs/sha256/{sha256(data)[7:]}"] = data
        return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

    def manifest(self, layers: list[bytes], config: dict[str, Any] | None = None, compression: str = "gzip",
                 **top: Any) -> dict[str, Any]:
        config_blob = self.blob(json.dumps(image_config(config, layers, **top)).encode(), OCI_CONFIG)
        descriptors = [self.blob(compress(x, compression), LAYER_TYPES[compression]) for x in layers]
        body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_blob, "layers": descriptors}
        return self.blob(json.dumps(body).encode(), OCI_MANIFEST)

    def add(self, descriptor: dict[str, Any], tag: str | None = None, **annotations: str) -> None:
        if tag is not None:
            annotations["org.opencontainers.image.ref.name"] = tag
        self.manifests.append({**descriptor, "annotations": annotations} if annotations else descriptor)

    def image(self, layers: list[bytes], config: dict[str, Any] | None = None, tag: str | None = None,
              compression: str = "gzip") -> None:
        self.add(self.manifest(layers, config, compression), tag)

    def all_files(self) -> dict[str, bytes]:
        return {**self.files, "index.json": json.dumps({"schemaVersion": 2, "manifests": self.manifests}).encode()}

    def to_dir(self, root: Path) -> Path:
        for name, data in self.all_files().items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root

    def to_tar(self, path: Path) -> Path:
        return write_tar(path, self.all_files())


def write_tar(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), T
            tar.addfile(ti, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.SYMTYPE, target
            tar.addfile(ti)
    return path


def docker_archive(path: Path, layers: list[bytes], config: dict[str, Any] | None = None,
                   repo_tags: list[str] | None = None, style: str = "docker") -> Path:
    """`docker save` (config <hex>.json, layers <id>/layer.tar), "podman" (+ symlinks) or "blobs" (docker 25+)."""
    config_data = json.dumps(image_config(config, layers, created="2020-09-13T12:26:40Z", author="Ann")).encode()
    files: dict[str, bytes] = {}
    symlinks: dict[str, str] = {}
    if style == "blobs":
        config_name = f"blobs/sha256/{sha256(config_data)[7:]}"
        layer_names = [f"blobs/sha256/{sha256(x)[7:]}" for x in layers]
    else:
        config_name = f"{sha256(config_data)[7:]}.json"
        layer_names = [f"{i:064x}/layer.tar" for i in range(len(layers))]
    files[config_name] = config_data
    for name, data in zip(layer_names, layers):
        if style == "podman":  # the real file is <diff_id>.tar; the legacy name is a symlink to it
            files[f"{sha256(data)[7:]}.tar"] = data
            symlinks[name] = f"../{sha256(data)[7:]}.tar"
        else:
            files[name] = data
    items = [{"Config": config_name, "RepoTags": repo_tags, "Layers": layer_names}]
    files["manifest.json"] = json.dumps(items).encode()
    return write_tar(path, files, symlinks)


@dataclass
class Aci:
    manifest: dict[str, Any]
    files: dict[str, tuple[str, Any]]  # rootfs path -> (kind, data / link target)
    data: bytes


def run(tmp_path: Path, text: str, **kw: Any) -> Aci:
    """Convert `text`; check the temporary directory is left empty; read the ACI back."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    ref = parse_reference(text)
    assert ref is not None
    out = io.BytesIO()
    try:
        manifest = convert(ref, out, tmp_dir=work, **kw)
    finally:
        assert list(work.iterdir()) == []
    files: dict[str, tuple[str, Any]] = {}
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as tar:
        assert json.loads(tar.extractfile("manifest").read()) == manifest  # type: ignore[union-attr]
        for m in tar:
            if m.name.startswith("rootfs/"):
                kind = "file" if m.isreg() else "dir" if m.isdir() else "symlink" if m.issym() else "hardlink"
                value = tar.extractfile(m).read() if m.isreg() else m.linkname  # type: ignore[union-attr]
                files[m.name[len("rootfs/"):]] = (kind, value)
    return Aci(manifest, files, out.getvalue())


def app(aci: Aci) -> dict[str, Any]:
    return aci.manifest["app"]


def labels(aci: Aci) -> dict[str, str]:
    return {x["name"]: x["value"] for x in aci.manifest.get("labels", [])}


def annotations(aci: Aci) -> dict[str, str]:
    return {x["name"]: x["value"] for x in aci.manifest.get("annotations", [])}


FULL_CONFIG = {
    "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["PATH=/bin", "A=1", "NOEQUALS", "A=2", "a.b=x"],
    "WorkingDir": "/srv", "User": "nobody", "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080": {}},
    "Volumes": {"/data": {}, "/var/lib/db": {}, "/var-lib/db": {}},
    "Labels": {"org.opencontainers.image.source": "https://example.com", "Maintainer": "dropped", "a..b": "dropped"},
}


# --------------------------------------------------------------------------------------------------
# References


def test_parse_reference():
    assert parse_reference("docker-archive:/tmp/x.tar") == OciReference("docker-archive", Path("/tmp/x.tar"))
    assert parse_reference("oci-archive:x.tar:v1") == OciReference("oci-archive", Path("x.tar"), "v1")
    assert parse_reference("docker-archive:x.tar:busybox:latest").tag == "busybox:latest"
    assert parse_reference("oci:dir") == OciReference("oci", Path("dir"))
    assert str(parse_reference("oci:dir:v1")) == "oci:dir:v1"
    for not_ours in ("busybox.aci", "docker://busybox", "https://x/y.aci", "ocifoo:x", "/abs/oci:x"):
        assert parse_reference(not_ours) is None
    for bad in ("oci:", "oci-archive::tag", "oci:dir:"):
        with pytest.raises(ImageError):
            parse_reference(bad)


def test_canonical_reference_ignores_how_the_path_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = parse_reference("oci:./x/../dir:v1"), parse_reference(f"oci:{tmp_path}/dir:v1")
    assert a is not None and b is not None and a.canonical() == b.canonical() == f"oci:{tmp_path}/dir:v1"


# --------------------------------------------------------------------------------------------------
# The three formats


def test_docker_archive(tmp_path):
    path = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER, APP_LAYER], FULL_CONFIG, ["busybox:latest"])
    aci = run(tmp_path, f"docker-archive:{path}")
    assert aci.manifest["name"] == "docker.io/library/busybox"
    assert labels(aci) == {"version": "latest", "os": "linux", "arch": "amd64"}
    assert app(aci) == {
        "exec": ["/bin/sh", "-c", "echo hi"], "user": "nobody", "group": "65533", "workingDirectory": "/srv",
        "environment": [{"name": "PATH", "value": "/bin"}, {"name": "A", "value": "2"}, {"name": "a.b", "value": "x"}],
        "mountPoints": [{"name": "volume-data", "path": "/data"}, {"name": "volume-var-lib-db", "path": "/var-lib/db"},
                        {"name": "volume-var-lib-db-2", "path": "/var/lib/db"}],
        "ports": [{"name": "53-udp", "protocol": "udp", "port": 53}, {"name": "80-tcp", "protocol": "tcp", "port": 80},
                  {"name": "8080-tcp", "protocol": "tcp", "port": 8080}],
    }
    config_digest = sha256(json.dumps(image_config(FULL_CONFIG, [BUSYBOX_LAYER, APP_LAYER], created="2020-09-13T12:26:40Z",
                                                   author="Ann")).encode())
    assert annotations(aci) == {
        "authors": "Ann", "created": "2020-09-13T12:26:40Z",
        "appc.io/docker/originalname": "busybox:latest", "appc.io/docker/registryurl": "docker.io",
        "appc.io/docker/repository": "library/busybox", "appc.io/docker/tag": "latest",
        "appc.io/docker/imageid": config_digest,
        "appc.io/docker/entrypoint": '["/bin/sh","-c"]', "appc.io/docker/cmd": '["echo hi"]',
        "org.opencontainers.image.source": "https://example.com",  # Maintainer, a..b: not AC Identifiers
    }
    assert aci.files["etc/hostname"] == ("file", b"app\n")
    assert aci.files["bin/sh"] == ("symlink", "busybox")
    assert "var/cache" not in aci.files and "var/cache/junk" not in aci.files and "var" in aci.files
    assert not any(".wh." in p for p in aci.files)


@pytest.mark.parametrize("style", ["podman", "blobs"])
def test_docker_archive_styles(tmp_path, style):
    path = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER, APP_LAYER], {"Cmd": ["/bin/sh"]},
                          ["localhost/app:1.0"], style=style)
    aci = run(tmp_path, f"docker-archive:{path}")
    assert aci.manifest["name"] == "localhost/app" and labels(aci)["version"] == "1.0"
    assert aci.files["srv/app"] == ("file", b"app")


def test_gzipped_docker_archive(tmp_path):
    path = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER], {"Cmd": ["sh"]}, ["busybox:1"])
    gz = tmp_path / "img.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    aci = run(tmp_path, f"docker-archive:{gz}")
    assert app(aci)["exec"] == ["/bin/sh"]  # found in PATH (Docker's default): /bin/sh -> busybox


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_oci_archive_with_whiteouts_and_links_across_layers(tmp_path, compression):
    layout = Layout()
    third = layer(H("bin/ash", "bin/busybox"), F("bin/busybox", b"new busybox", 0o755), D("srv", 0o700),
                  F("srv/.wh..wh..opq"), F("srv/fresh", b"f"))
    layout.image([BUSYBOX_LAYER, APP_LAYER, third], {"Cmd": ["/bin/ash"]}, tag="v2", compression=compression)
    aci = run(tmp_path, f"oci-archive:{layout.to_tar(tmp_path / 'img.tar')}")
    assert aci.files["bin/busybox"] == ("file", b"new busybox")
    assert aci.files["bin/ash"] == ("file", b"#!busybox")  # linked before the layer replaced its target
    assert "srv/app" not in aci.files and aci.files["srv/fresh"] == ("file", b"f")
    assert aci.manifest["name"].startswith("sha256-") and labels(aci)["version"] == "v2"  # a bare tag: no repository


def test_oci_layer_hard_link_to_a_lower_file_stays_a_link(tmp_path):
    layout = Layout()
    layout.image([BUSYBOX_LAYER, layer(H("bin/ash", "bin/busybox"))], {"Cmd": ["/bin/ash"]})
    aci = run(tmp_path, f"oci:{layout.to_dir(tmp_path / 'layout')}")
    assert aci.files["bin/ash"] == ("hardlink", "rootfs/bin/busybox")


def test_oci_dir_with_tags(tmp_path):
    layout = Layout()
    layout.image([BUSYBOX_LAYER], {"Cmd": ["/bin/sh"], "Env": ["WHICH=one"]}, tag="quay.io/org/tool:1")
    layout.image([BUSYBOX_LAYER], {"Cmd": ["/bin/sh"], "Env": ["WHICH=two"]}, tag="2")
    root = layout.to_dir(tmp_path / "layout")
    one = run(tmp_path, f"oci:{root}:quay.io/org/tool:1")
    assert one.manifest["name"] == "quay.io/org/tool" and labels(one)["version"] == "1"
    assert app(one)["environment"] == [{"name": "WHICH", "value": "one"}]
    two = run(tmp_path, f"oci:{root}:2")
    assert app(two)["environment"] == [{"name": "WHICH", "value": "two"}]
    with pytest.raises(ImageError) as exc:
        run(tmp_path, f"oci:{root}")
    assert str(exc.value) == (f"{root}: index.json holds 2 images; choose one with oci:DIR:TAG or "
                              "oci-archive:FILE:TAG (tags: quay.io/org/tool:1, 2)")
    with pytest.raises(ImageError, match=r"index.json: no image is tagged 3 \(tags: quay.io/org/tool:1, 2\)$"):
        run(tmp_path, f"oci:{root}:3")


def test_bare_tag_with_the_full_name_docker_exports(tmp_path):
    layout = Layout()
    layout.add(layout.manifest([BUSYBOX_LAYER], {"Cmd": ["/bin/sh"]}), "latest",
               **{"io.containerd.image.name": "docker.io/library/busybox:latest"})
    aci = run(tmp_path, f"oci:{layout.to_dir(tmp_path / 'l')}")
    assert aci.manifest["name"] == "docker.io/library/busybox" and labels(aci)["version"] == "latest"


def test_image_index_resolves_to_linux_amd64(tmp_path):
    layout = Layout()
    arm = layout.manifest([layer(F("which", b"arm"))], {"Cmd": ["/which"]}, architecture="arm64")
    amd = layout.manifest([layer(F("which", b"amd", 0o755))], {"Cmd": ["/which"]})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{**arm, "platform": {"os": "linux", "architecture": "arm64"}},
                           {**amd, "platform": {"os": "linux", "architecture": "amd64"}}]}
    layout.add(layout.blob(json.dumps(index).encode(), OCI_INDEX), "multi")
    aci = run(tmp_path, f"oci:{layout.to_dir(tmp_path / 'l')}")
    assert aci.files["which"] == ("file", b"amd")
    assert annotations(aci)["appc.io/docker/manifesthash"] == amd["digest"]


def test_untagged_docker_archive_is_named_after_its_config_digest(tmp_path):
    path = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER], None, None)
    aci = run(tmp_path, f"docker-archive:{path}")
    assert aci.manifest["name"] == annotations(aci)["appc.io/docker/imageid"].replace(":", "-")
    assert "app" not in aci.manifest and "version" not in labels(aci)  # no Entrypoint/Cmd: no app


def test_conversion_is_deterministic_and_the_aci_makes_a_disk(tmp_path):
    path = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER, APP_LAYER], FULL_CONFIG, ["busybox:latest"])
    first, second = run(tmp_path, f"docker-archive:{path}"), run(tmp_path, f"docker-archive:{path}")
    assert hashlib.sha512(first.data).digest() == hashlib.sha512(second.data).digest()
    aci = tmp_path / "x.aci"
    aci.write_bytes(first.data)
    with tarfile.open(aci, "r:") as tar:  # what the store runs on import, then the disk builder
        parse_manifest(tar.extractfile("manifest").read())  # type: ignore[union-attr]
        build_iso(entries_from_tar(tar), tmp_path / "x.iso")


# --------------------------------------------------------------------------------------------------
# Users, commands, platforms


@pytest.mark.parametrize(("user", "expected"), [
    ("", ("0", "0")), ("nobody", ("nobody", "65533")), ("65534", ("65534", "65533")), ("1000", ("1000", "0")),
    ("ghost", ("ghost", "0")), ("1000:1001", ("1000", "1001")), ("nobody:users", ("nobody", "users")),
])
def test_user_and_group(tmp_path, user, expected):
    path = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER], {"Cmd": ["/bin/sh"], "User": user}, ["u:1"])
    aci = run(tmp_path, f"docker-archive:{path}")
    assert (app(aci)["user"], app(aci)["group"]) == expected


@pytest.mark.parametrize(("cmd", "workdir", "expected"), [
    (["sh", "-c", "x"], "", ["/bin/sh", "-c", "x"]),
    (["./app"], "/srv", ["/srv/app"]),
    (["/not/checked"], "", ["/not/checked"]),
])
def test_exec_becomes_absolute(tmp_path, cmd, workdir, expected):
    path = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER], {"Cmd": cmd, "WorkingDir": workdir}, ["c:1"])
    assert app(run(tmp_path, f"docker-archive:{path}"))["exec"] == expected


def test_exec_not_in_path_is_an_error(tmp_path):
    path = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER], {"Cmd": ["python3"], "Env": ["PATH=/usr/bin:/bin"]},
                          ["c:1"])
    with pytest.raises(ImageError, match=r"the command 'python3' .* is not an executable in the image's PATH "
                                         r"\(/usr/bin:/bin\)"):
        run(tmp_path, f"docker-archive:{path}")


def test_unknown_platform_is_an_error(tmp_path):
    layout = Layout()
    layout.add(layout.manifest([BUSYBOX_LAYER], {"Cmd": ["/bin/sh"]}, os="windows"), "w")
    with pytest.raises(ImageError, match=r"config: platform windows/amd64 has no appc os/arch label$"):
        run(tmp_path, f"oci:{layout.to_dir(tmp_path / 'l')}")


# --------------------------------------------------------------------------------------------------
# Broken and hostile sources


def test_missing_manifest_json(tmp_path):
    path = write_tar(tmp_path / "busybox.tar", {"something": b"else"})
    with pytest.raises(ImageError) as exc:
        run(tmp_path, f"docker-archive:{path}")
    assert str(exc.value) == f"{path}: manifest.json: no such member (not a docker-archive?)"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        run(tmp_path, f"oci-archive:{tmp_path}/nope.tar")
    with pytest.raises(ImageError, match="no such directory"):
        run(tmp_path, f"oci:{tmp_path}/nope")
    with pytest.raises(ImageError, match=r"oci-layout: no such file \(not an OCI image layout\?\)"):
        run(tmp_path, f"oci:{tmp_path}")


def corrupt_layer(layout: Layout, new: bytes) -> str:
    """Replace the content of the (only) layer blob; return its name."""
    name = next(n for n, d in layout.files.items() if d.startswith(b"\x1f\x8b"))
    layout.files[name] = new
    return name


def test_layer_digest_mismatch(tmp_path):
    layout = Layout()
    layout.image([BUSYBOX_LAYER], {"Cmd": ["/bin/sh"]})
    good = next(d for d in layout.files.values() if d.startswith(b"\x1f\x8b"))
    name = corrupt_layer(layout, good[:-5] + b"\0\0\0\0\0")
    path = layout.to_tar(tmp_path / "img.tar")
    with pytest.raises(ImageError, match=rf"^{path}: {name}: "):
        run(tmp_path, f"oci-archive:{path}")
    # Same size, one flipped byte in the gzip header's mtime: decompresses fine, digest differs.
    name = corrupt_layer(layout, good[:4] + b"\x01" + good[5:])
    path = layout.to_tar(tmp_path / "img2.tar")
    with pytest.raises(ImageError, match=rf"^{path}: {name}: digest mismatch \(expected sha256:"):
        run(tmp_path, f"oci-archive:{path}")


def test_config_digest_mismatch(tmp_path):
    layout = Layout()
    layout.image([BUSYBOX_LAYER], {"Cmd": ["/bin/sh"]})
    name = next(n for n, d in layout.files.items() if b'"diff_ids"' in d)
    layout.files[name] = layout.files[name].replace(b"/bin/sh", b"/bin/xx")
    root = layout.to_dir(tmp_path / "l")
    with pytest.raises(ImageError, match=rf"^{root}: {name}: digest mismatch"):
        run(tmp_path, f"oci:{root}")


def test_uncompressed_content_must_match_the_diff_id(tmp_path):
    path = docker_archive(tmp_path / "img.tar", [BUSYBOX_LAYER], {"Cmd": ["/bin/sh"]}, ["a:1"])
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    layer_name = next(n for n in files if n.endswith("layer.tar"))
    files[layer_name] = APP_LAYER
    path = write_tar(tmp_path / "img2.tar", files)
    with pytest.raises(ImageError, match=rf"{layer_name}: the uncompressed layer does not match the config's diff_id"):
        run(tmp_path, f"docker-archive:{path}")


def test_descriptor_size_mismatch(tmp_path):
    layout = Layout()
    desc = layout.manifest([BUSYBOX_LAYER], {"Cmd": ["/bin/sh"]})
    layout.add({**desc, "size": desc["size"] + 1})
    with pytest.raises(ImageError, match=r"size mismatch"):
        run(tmp_path, f"oci:{layout.to_dir(tmp_path / 'l')}")


@pytest.mark.parametrize("digest", ["sha256/../../etc/passwd", "sha256:../../../etc/passwd", "md5:abc",
                                    "sha256:" + "A" * 64, 42])
def test_traversal_and_malformed_digests(tmp_path, digest):
    layout = Layout()
    layout.add({"mediaType": OCI_MANIFEST, "digest": digest, "size": 10})
    with pytest.raises(ImageError, match=r"is not sha256:<64 hex> or sha512:<128 hex>"):
        run(tmp_path, f"oci:{layout.to_dir(tmp_path / 'l')}")


@pytest.mark.parametrize("name", ["../evil.tar", "/etc/passwd", "a/../../b"])
def test_traversal_in_docker_archive_names(tmp_path, name):
    config = json.dumps(image_config({}, [BUSYBOX_LAYER])).encode()
    items = [{"Config": "c.json", "RepoTags": ["a:1"], "Layers": [name]}]
    path = write_tar(tmp_path / "img.tar", {"manifest.json": json.dumps(items).encode(), "c.json": config})
    with pytest.raises(ImageError, match=r"manifest.json: Layers\[0\]: .* points outside the archive"):
        run(tmp_path, f"docker-archive:{path}")


def test_traversal_in_archive_members_and_links(tmp_path):
    path = write_tar(tmp_path / "img.tar", {"manifest.json": b"[]", "../../evil": b"x"})
    with pytest.raises(ImageError, match=r'"../../evil" points outside the archive'):
        run(tmp_path, f"docker-archive:{path}")
    path = docker_archive(tmp_path / "img2.tar", [BUSYBOX_LAYER], {"Cmd": ["/bin/sh"]}, ["a:1"], style="podman")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar]  # type: ignore[union-attr]
    with tarfile.open(tmp_path / "img3.tar", "w") as out:
        for m, data in members:
            if m.issym():
                m.linkname = "../../../etc/passwd"
            out.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ImageError, match=r"points outside the archive"):
        run(tmp_path, f"docker-archive:{tmp_path / 'img3.tar'}")


def test_several_images_without_a_tag(tmp_path):
    config = json.dumps(image_config({}, [BUSYBOX_LAYER])).encode()
    items = [{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["l.tar"]},
             {"Config": "c.json", "RepoTags": ["b:2", "b:latest"], "Layers": ["l.tar"]}]
    path = write_tar(tmp_path / "img.tar", {"manifest.json": json.dumps(items).encode(), "c.json": config,
                                             "l.tar": BUSYBOX_LAYER})
    with pytest.raises(ImageError, match=r"holds 2 images; choose one with docker-archive:FILE:NAME:TAG \(a:1, b:2\)$"):
        run(tmp_path, f"docker-archive:{path}")
    aci = run(tmp_path, f"docker-archive:{path}:docker.io/library/b:latest")
    assert aci.manifest["name"] == "docker.io/library/b" and labels(aci)["version"] == "latest"


def test_hostile_layer_entries_are_refused_like_in_an_aci(tmp_path):
    evil = layer(L("lib", "/etc"))
    through = layer(F("lib/passwd", b"owned"))
    layout = Layout()
    layout.image([evil, through], {"Cmd": ["/x"]})
    root = layout.to_dir(tmp_path / "l")
    with pytest.raises(ImageError, match=r"blobs/sha256/\w+: /lib/passwd: its parent /lib is a symlink"):
        run(tmp_path, f"oci:{root}")
    layout = Layout()
    layout.image([layer(F("../escape"))], {"Cmd": ["/x"]})
    with pytest.raises(ImageError, match=r"blobs/sha256/\w+: ../escape: '..' components are not allowed"):
        run(tmp_path, f"oci:{layout.to_dir(tmp_path / 'l2')}")
    layout = Layout()
    layout.image([layer(("dev/null", tarfile.CHRTYPE, None))], {"Cmd": ["/x"]})
    with pytest.raises(DiskError, match=r"blobs/sha256/\w+: dev/null: device nodes are not supported"):
        run(tmp_path, f"oci:{layout.to_dir(tmp_path / 'l3')}")


def test_a_layer_that_is_not_a_tar(tmp_path):
    layout = Layout()
    layout.image([b"x" * 2000], {"Cmd": ["/x"]}, compression="none")
    with pytest.raises(ImageError, match=r"blobs/sha256/\w+: not a tar archive"):
        run(tmp_path, f"oci:{layout.to_dir(tmp_path / 'l')}")


def test_limits_stop_a_layer_bomb(tmp_path):
    layout = Layout()
    layout.image([layer(F("zeros", b"\0" * 200_000))], {"Cmd": ["/x"]})
    root = layout.to_dir(tmp_path / "l")
    with pytest.raises(ImageError, match=r"uncompressed layers exceed the 97.7 KiB limit"):
        run(tmp_path, f"oci:{root}", limits=ImportLimits(max_size=100_000))
    with pytest.raises(ImageError, match=r"the layers hold more than 0 entries"):
        run(tmp_path, f"oci:{root}", limits=ImportLimits(max_entries=0))


def test_progress_counts_the_blob_bytes(tmp_path):
    layout = Layout()
    layout.image([BUSYBOX_LAYER, APP_LAYER], {"Cmd": ["/bin/sh"]})
    root = layout.to_dir(tmp_path / "l")
    seen: list[int] = []
    run(tmp_path, f"oci:{root}", progress=seen.append)
    layer_sizes = sum(len(d) for d in layout.files.values() if d.startswith(b"\x1f\x8b"))
    assert sum(seen) == layer_sizes


def test_fifo_in_a_layout_is_refused_without_hanging(tmp_path):
    layout = Layout()
    layout.image([BUSYBOX_LAYER], {"Cmd": ["/bin/sh"]})
    root = layout.to_dir(tmp_path / "l")
    (root / "index.json").unlink()
    os.mkfifo(root / "index.json")
    with pytest.raises(ImageError, match=r"index.json: not a regular file"):
        run(tmp_path, f"oci:{root}")


# --------------------------------------------------------------------------------------------------
# A real image: buildah FROM scratch


@pytest.mark.parametrize("kind", ["docker_archive", "oci_archive"])
def test_buildah_busybox_image(tmp_path, busybox_oci_archives, kind):
    path = getattr(busybox_oci_archives, kind)
    transport = kind.replace("_", "-")
    aci = run(tmp_path, f"{transport}:{path}")
    assert aci.manifest["name"] == IMAGE.rpartition(":")[0] and labels(aci)["version"] == IMAGE.rpartition(":")[2]
    assert app(aci)["exec"] == BUSYBOX_CONFIG["Entrypoint"] + BUSYBOX_CONFIG["Cmd"]
    assert (app(aci)["user"], app(aci)["group"]) == ("1000", "1000")
    assert app(aci)["workingDirectory"] == BUSYBOX_CONFIG["WorkingDir"]
    assert [f"{e['name']}={e['value']}" for e in app(aci)["environment"]] == BUSYBOX_CONFIG["Env"]
    assert aci.files["bin/busybox"] == ("file", Path("/bin/busybox").read_bytes())
    assert {aci.files[f"bin/{a}"] for a in ("sh", "echo", "cat")} == {("symlink", "busybox")}
    assert aci.files["etc/greeting"] == ("file", GREETING.encode())
    assert "etc/obsolete" not in aci.files  # the second layer's whiteout
    assert aci.files["srv"][0] == "dir"
    again = run(tmp_path, f"{transport}:{path}")
    assert again.data == aci.data


# --- running converted images: `-- ARGS` keep the ENTRYPOINT ---------------------------------------

def _converted(annotations: dict[str, str]):
    from kvmpod.image.manifest import App, ImageManifest
    from kvmpod.store import StoredImage

    manifest = ImageManifest("example.com/x", {}, App(["/bin/sh", "-c", "echo default"], "0", "0"), {},
                             annotations=annotations)
    return StoredImage("sha512-" + "0" * 128, Path("/nonexistent"), manifest)


@pytest.mark.parametrize("annotations, exec_, args, expected", [
    ({"appc.io/docker/entrypoint": '["sh", "-c"]'}, None, ["echo hi"], (None, ["-c", "echo hi"])),
    ({"appc.io/docker/entrypoint": '["sh", "-c"]'}, "/bin/echo", ["x"], ("/bin/echo", ["x"])),  # --exec: appc rule
    ({"appc.io/docker/entrypoint": '["sh", "-c"]'}, None, None, (None, None)),                 # no -- ARGS
    ({"appc.io/docker/entrypoint": "not json"}, None, ["a"], (None, ["a"])),
    ({}, None, ["a"], (None, ["a"])),                                                         # a native ACI
])
def test_args_replace_the_cmd_but_keep_the_entrypoint(annotations, exec_, args, expected):
    from kvmpod.pod.launch import keep_docker_entrypoint
    from kvmpod.pod.spec import AppOverrides

    out = keep_docker_entrypoint(_converted(annotations), AppOverrides(image="x", exec=exec_, args=args))
    assert (out.exec, out.args) == expected


# --- into the store: `kvmpod image import` of a Docker/OCI source -------------------------------

def test_image_import_stores_a_converted_image_once(tmp_path, busybox_oci_archives):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KVMPOD_STORE_DIR"}

    def kvmpod(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "kvmpod", "--dir", str(tmp_path / "store"), *args],
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    source = f"docker-archive:{busybox_oci_archives.docker_archive}"
    first = kvmpod("image", "import", source).strip()
    assert kvmpod("image", "import", source).strip() == first  # unchanged source: not converted again
    [record] = json.loads(kvmpod("image", "list", "--json"))
    assert (record["id"], record["name"], record["signature"]) == (first, IMAGE.rpartition(":")[0], "not-checked")
    assert record["source"] == f"docker-archive:{os.path.realpath(busybox_oci_archives.docker_archive)}"
    # the OCI archive of the same image records its own source annotations: a second image, same name
    second = kvmpod("fetch", f"oci-archive:{busybox_oci_archives.oci_archive}").strip()
    assert second != first and kvmpod("image", "cat-manifest", second) != kvmpod("image", "cat-manifest", first)
    assert json.loads(kvmpod("image", "cat-manifest", "example.com/kvmpod-test/busybox:1.0"))["name"] == \
        IMAGE.rpartition(":")[0]
