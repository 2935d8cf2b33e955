"""Apps rooted in a host directory (OCI bundles, rkt's rendered apps): from AppOverrides to START."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmpod.agent import protocol as p
from kvmpod.agent.session import ProcessSpec
from kvmpod.errors import KvmpodError
from kvmpod.image.manifest import build_manifest, parse_manifest
from kvmpod.pod.launch import directory_image
from kvmpod.pod.spec import AppOverrides, ProcessExtras, resolve_app

F = p.Field


def _manifest():
    return parse_manifest(json.dumps(build_manifest("example.com/dir", exec_=["/bin/app"])).encode())


def test_a_directory_app_stands_for_its_image_by_manifest(tmp_path):
    image = directory_image(AppOverrides(image="dir", rootfs_dir=tmp_path, image_manifest=_manifest()))
    assert image.blob == tmp_path and image.manifest.name == "example.com/dir"
    assert image.id.startswith("sha512-") and len(image.id) == 7 + 128
    again = directory_image(AppOverrides(image="dir", rootfs_dir=tmp_path, image_manifest=_manifest()))
    assert again.id == image.id  # the same manifest, the same stand-in ID
    given = directory_image(AppOverrides(image="dir", rootfs_dir=tmp_path, image_manifest=_manifest(),
                                         image_id="sha512-" + "a" * 128))
    assert given.id == "sha512-" + "a" * 128


def test_a_rootfs_that_is_not_a_directory_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KvmpodError, match=r"file: the app's rootfs is not a directory"):
        directory_image(AppOverrides(image="dir", rootfs_dir=tmp_path / "file", image_manifest=_manifest()))


def test_root_tag_limits_and_keep_etc_reach_start(tmp_path):
    extras = ProcessExtras(rlimits=((7, 1024, 2048),), oom_score_adj=-500, keep_etc=True)
    overrides = AppOverrides(image="dir", rootfs_dir=tmp_path, image_manifest=_manifest(), extras=extras)
    app = resolve_app(directory_image(overrides), overrides, {}, tmp_path, "root0", root_share=True)
    assert app.root_share and app.extras == extras
    spec = ProcessSpec(app.name, app.disk_serial, app.argv, app.env, root_tag="root0", keep_etc=True,
                       rlimits=extras.rlimits, oom_score_adj=extras.oom_score_adj)
    start = p.Start.decode(spec.message().encode())
    assert start.root_tag == b"root0" and start.disk_serial == b"root0"
    assert start.rlimit == [b"7 1024 2048"]
    assert start.oom_score_adj == -500
    assert start.start_flags is not None and start.start_flags & p.StartFlag.KEEP_ETC


def test_an_image_app_sends_none_of_them():
    start = ProcessSpec("a", "img0", ["/bin/app"], []).message()
    assert start.root_tag is None and start.rlimit == [] and start.oom_score_adj is None
    tags = {tag for tag, _ in p.iter_tlv(start.encode())}
    assert not tags & {F.ROOT_TAG, F.RLIMIT, F.OOM_SCORE_ADJ}
    assert start.start_flags == 0
