"""The sha256 helpers behind `ms2mg verify` and the rerun check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ms2mg_converter.write import manifest
from ms2mg_converter.write.manifest import FileDigests, file_sha256


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 17])
def test_blockwise_sha256_equals_hashlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(manifest, "_HASH_BLOCK", 4096)  # many blocks, and a short last one
    path = tmp_path / "f.bin"
    path.write_bytes(bytes((i * 7 + 3) % 256 for i in range(size)))
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_digests_report_changed_files_only(tmp_path: Path) -> None:
    for name, data in (("a", b"alpha"), ("b", b"beta")):
        (tmp_path / name).write_bytes(data)
    expected = {"a": hashlib.sha256(b"alpha").hexdigest(), "b": hashlib.sha256(b"other").hexdigest(),
                "missing": "0" * 64}
    with FileDigests(tmp_path, expected) as digests:
        problems = digests.problems()
    assert problems == ["b: sha256 differs from the manifest (the file changed on disk)"]


def test_file_digests_report_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"x")
    with FileDigests(tmp_path, {"d/x": "0" * 64}) as digests:
        (tmp_path / "d" / "x").unlink()  # gone between the listing and the hashing: may or may not be hashed
        problems = digests.problems()
    assert len(problems) == 1 and problems[0].startswith("d/x: ")
