"""--load-root / --save-root: nothing is read or written through a symlink that leaves its volume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ms2mg_converter.confine import check_open_file, inside
from ms2mg_converter.errors import SourceError
from tests.converter.conftest import run_cli, sample_flags


@pytest.fixture
def volumes(tmp_path: Path, make_sample) -> tuple[Path, Path, Path, list[str]]:
    """A source volume with a checkpoint, an empty destination volume, and a place outside both."""
    src_vol, dst_vol, outside = tmp_path / "src-vol", tmp_path / "dst-vol", tmp_path / "outside"
    for d in (src_vol, dst_vol, outside):
        d.mkdir()
    ckpt, spec, _ = make_sample()
    ckpt.rename(outside / "ckpt")
    return src_vol, dst_vol, outside, sample_flags(spec)


def convert(load: Path, save: Path, src_vol: Path, dst_vol: Path, flags: list[str], result: Path):
    return run_cli("convert", "--load-dir", str(load), "--save-dir", str(save), "--load-root", str(src_vol),
                   "--save-root", str(dst_vol), *flags, "--result-file", str(result))


def test_links_inside_the_volumes_are_fine(volumes, tmp_path):
    src_vol, dst_vol, outside, flags = volumes
    (outside / "ckpt").rename(src_vol / "real")
    (src_vol / "link").symlink_to("real")
    (dst_vol / "runs").mkdir()
    (dst_vol / "latest").symlink_to("runs")
    r = convert(src_vol / "link", dst_vol / "latest" / "out", src_vol, dst_vol, flags, tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert (dst_vol / "runs" / "out" / "ms2mg-manifest.json").is_file()


def test_source_directory_link_leaving_the_volume(volumes, tmp_path):
    src_vol, dst_vol, outside, flags = volumes
    (src_vol / "ckpt").symlink_to(outside / "ckpt")
    r = convert(src_vol / "ckpt", dst_vol / "out", src_vol, dst_vol, flags, tmp_path / "r.json")
    assert r.returncode == 3 and "outside --load-root" in r.stderr, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["reason"] == "InvalidSource"
    assert not (dst_vol / "out").exists()


def test_source_file_link_leaving_the_volume(volumes, tmp_path):
    src_vol, dst_vol, outside, flags = volumes
    (src_vol / "ckpt").mkdir()
    (src_vol / "ckpt" / "model.safetensors").symlink_to(outside / "ckpt" / "model.safetensors")
    r = convert(src_vol / "ckpt", dst_vol / "out", src_vol, dst_vol, flags, tmp_path / "r.json")
    assert r.returncode == 3 and "model.safetensors" in r.stderr and "outside --load-root" in r.stderr, r.stderr


def test_destination_parent_link_leaving_the_volume(volumes, tmp_path):
    src_vol, dst_vol, outside, flags = volumes
    (outside / "ckpt").rename(src_vol / "ckpt")
    (dst_vol / "escape").symlink_to(outside)
    r = convert(src_vol / "ckpt", dst_vol / "escape" / "out", src_vol, dst_vol, flags, tmp_path / "r.json")
    assert r.returncode == 4 and "outside --save-root" in r.stderr, r.stderr
    assert sorted(p.name for p in outside.iterdir()) == []
    assert sorted(p.name for p in dst_vol.iterdir()) == ["escape"]


def test_destination_itself_a_link(volumes, tmp_path):
    src_vol, dst_vol, outside, flags = volumes
    (outside / "ckpt").rename(src_vol / "ckpt")
    (dst_vol / "out").symlink_to(outside)
    r = convert(src_vol / "ckpt", dst_vol / "out", src_vol, dst_vol, [*flags, "--overwrite"], tmp_path / "r.json")
    assert r.returncode == 4 and "symbolic link" in r.stderr, r.stderr
    assert list(outside.iterdir()) == []


def test_inside_and_open_file_check(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "rootless").mkdir()  # a sibling whose name starts like the root
    assert inside(tmp_path / "root" / "a" / "..", tmp_path / "root")
    assert not inside(tmp_path / "rootless", tmp_path / "root")
    f = tmp_path / "rootless" / "x"
    f.write_text("x")
    with f.open() as fh:
        check_open_file(fh.fileno(), f, None)
        check_open_file(fh.fileno(), f, tmp_path)
        with pytest.raises(SourceError, match="outside --load-root"):
            check_open_file(fh.fileno(), f, tmp_path / "root")
