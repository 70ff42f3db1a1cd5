"""O_DIRECT output: exact bytes, identical checkpoints with and without it, the fallback, and a full disk."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ms2mg_converter.write.directio import BLOCK, BUFFER_BYTES, BufferedFile, DirectFile, open_output
from tests.converter.conftest import sample_flags

ROOT = os.geteuid() == 0


def test_direct_file_writes_exactly_the_bytes(tmp_path):
    f = open_output(tmp_path / "x.bin")
    assert isinstance(f, DirectFile), "tmp_path is expected on a file system with O_DIRECT (ext4 here)"
    rng = random.Random(0)
    expected = bytearray()
    sizes = [1, BLOCK - 1, BLOCK, BLOCK + 1, BUFFER_BYTES - 3, BUFFER_BYTES, 2 * BUFFER_BYTES + 5, 17, 0, 12345]
    for n in sizes:
        data = rng.randbytes(n)
        f.write(data if n % 2 else memoryview(data))
        expected += data
    f.close()
    f.sync()
    assert (tmp_path / "x.bin").read_bytes() == bytes(expected)


def test_refuses_an_existing_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        open_output(tmp_path / "x.bin")
    assert (tmp_path / "x.bin").read_bytes() == b"mine"


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("iter_*/*/*.pt"))}


def test_same_checkpoint_with_and_without_direct_io(make_sample, tmp_path):
    src, spec, _ = make_sample(bias="all", fc1_layout="interleaved", vocab_size=3000, hidden_size=128)
    outs = {}
    for mode in ("1", "0"):
        dst = tmp_path / f"out-{mode}"
        r = subprocess.run([sys.executable, "-m", "ms2mg_converter", "convert", "--load-dir", str(src), "--save-dir",
                            str(dst), *sample_flags(spec), "--tp", "2", "--pp", "2", "--progress", "none"],
                           capture_output=True, text=True, env={**os.environ, "MS2MG_DIRECT_IO": mode}, check=False)
        assert r.returncode == 0, r.stderr
        outs[mode] = _digests(dst)
        manifest = json.loads((dst / "ms2mg-manifest.json").read_text())
        assert {f["path"]: f["sha256"] for f in manifest["files"]} == outs[mode]
    assert outs["1"] == outs["0"] and len(outs["1"]) == 4


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[dict[str, Path]]:
    if not ROOT:
        pytest.skip("mounting file systems needs root (CI runs as root)")
    made: list[Path] = []

    def mount(kind: str, size_mb: int) -> Path:
        point = tmp_path / f"mnt-{kind}"
        point.mkdir()
        if kind == "ext4":
            image = tmp_path / "disk.ext4"
            subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
            subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
        made.append(point)
        return point

    try:
        yield {"ext4": mount("ext4", 24)}
    finally:
        for point in reversed(made):
            subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("where", ["open", "first write"])
def test_falls_back_to_buffered_where_o_direct_is_refused(tmp_path, monkeypatch, where):
    """File systems without O_DIRECT refuse it at open (EINVAL) or at the first write; both fall back."""
    real_open, real_write = os.open, os.write

    def fake_open(path, flags, *args):
        if where == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def fake_write(fd, data):
        if where == "first write" and os.get_blocking(fd) is not None and _is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)
    f = open_output(tmp_path / "x.bin")
    assert isinstance(f, BufferedFile)
    f.write(b"abc")
    f.close()
    f.sync()
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def test_switched_off_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MS2MG_DIRECT_IO", "0")
    assert isinstance(open_output(tmp_path / "x.bin"), BufferedFile)


def test_disk_full_through_direct_io(mounted, make_sample, tmp_path):
    """A 24 MB ext4 disk and a ~40 MB conversion: ENOSPC from an O_DIRECT write is exit 6, names the file,
    and leaves nothing behind."""
    src, spec, _ = make_sample(num_layers=8, hidden_size=256, ffn_hidden_size=1024, vocab_size=8000)
    dst = mounted["ext4"] / "out"
    result = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "-m", "ms2mg_converter", "convert", "--load-dir", str(src), "--save-dir",
                        str(dst), *sample_flags(spec), "--dtype", "fp32", "--progress", "none",
                        "--result-file", str(result)], capture_output=True, text=True, check=False)
    assert r.returncode == 6, r.stderr
    assert "No space left on device" in r.stderr and "model_optim_rng.pt" in r.stderr, r.stderr
    assert json.loads(result.read_text())["reason"] == "IOError"
    assert sorted(p.name for p in mounted["ext4"].iterdir()) == ["lost+found"]
