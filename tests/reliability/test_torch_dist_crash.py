"""torch_dist output under kills and bad input (issue 12 item 1), modelled on test_crash_safety/test_bad_input.

* SIGKILL while the data file is being written, and from inside the writer just before `metadata.json` (the
  last file of the iteration directory) and just before the tracker: the destination stays absent (the
  staging directory is never a checkpoint), and a rerun removes what the killed run left, writes the
  checkpoint and verifies it;
* a NaN in the source is refused before anything reaches the destination;
* a failing write (disk full, simulated) names the file and leaves nothing at the destination.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ms2mg_converter.demo.sample import SampleSpec, build_sample
from tests.reliability.corpus import flags_for

pytestmark = pytest.mark.slow

SPEC = SampleSpec(num_layers=8, hidden_size=384, ffn_hidden_size=1024, vocab_size=8000)
STALE = "removed the staging directory of an earlier, interrupted run"


def cmd(src: Path, dst: Path, *extra: str, inject: str = "") -> list[str]:
    args = ["convert", "--load-dir", str(src), "--save-dir", str(dst), *flags_for(SPEC), "--ckpt-format",
            "torch_dist", "--tp", "2", "--pp", "2", "--progress", "none", *extra]
    if inject:
        code = inject + "\nimport sys\nfrom ms2mg_converter.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
        return [sys.executable, "-c", code, *args]
    return [sys.executable, "-m", "ms2mg_converter", *args]


def run(c: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(c, capture_output=True, text=True, timeout=600, check=False)


def staged(dst: Path) -> list[Path]:
    return list(dst.parent.glob(f".{dst.name}.ms2mg-staging-*"))


def distcp_bytes(dst: Path) -> int:
    total = 0
    for d in staged(dst):
        for f in d.glob("iter_*/__0_0.distcp"):
            with contextlib.suppress(FileNotFoundError):
                total += f.stat().st_size
    return total


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist-crash")
    build_sample(SPEC, root / "src")
    return root / "src"


def _rerun_recovers(src: Path, dst: Path) -> None:
    r = run(cmd(src, dst))
    assert r.returncode == 0, r.stderr
    assert STALE in r.stderr
    assert staged(dst) == []
    v = run([sys.executable, "-m", "ms2mg_converter", "verify", "--load-dir", str(src), "--save-dir", str(dst)])
    assert v.returncode == 0, v.stdout + v.stderr


def test_sigkill_while_writing_the_data_file(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    p = subprocess.Popen(cmd(src, dst), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while p.poll() is None and distcp_bytes(dst) < 1_000_000 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert p.poll() is None, "the conversion ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert not dst.exists()
    assert len(staged(dst)) == 1
    assert not list(staged(dst)[0].glob("iter_*/metadata.json")), "a half-written checkpoint looks complete"
    _rerun_recovers(src, dst)


@pytest.mark.parametrize("before", ["metadata.json", "latest_checkpointed_iteration.txt"])
def test_sigkill_inside_the_writer_before_the_last_files(src: Path, tmp_path: Path, before: str) -> None:
    inject = f"""
import os, signal
import ms2mg_converter.write.torch_dist as td
real = td.write_synced
def write_small(path, data):
    if path.name == {before!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
td.write_synced = write_small
"""
    dst = tmp_path / "out"
    r = run(cmd(src, dst, inject=inject))
    assert r.returncode == -signal.SIGKILL
    assert not dst.exists()
    _rerun_recovers(src, dst)


def test_nan_in_the_source_is_refused(src: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
            continue
        tensors = load_file(str(f))
        name = next(k for k in sorted(tensors) if "layers.3" in k and tensors[k].ndim == 2)
        t = tensors[name].copy()
        t[1, 2] = np.nan
        tensors[name] = t
        save_file(tensors, str(bad / f.name))
    dst = tmp_path / "out"
    r = run(cmd(bad, dst))
    assert r.returncode != 0
    assert "NaN" in r.stderr or "non-finite" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not dst.exists()
    assert staged(dst) == []


def test_disk_full_names_the_file_and_leaves_nothing(src: Path, tmp_path: Path) -> None:
    inject = """
import errno
import ms2mg_converter.write.torch_dist as td
def write_small(path, data):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
td.write_synced = write_small
"""
    dst = tmp_path / "out"
    r = run(cmd(src, dst, inject=inject))
    assert r.returncode != 0
    assert "No space left on device" in r.stderr
    assert ".metadata" in r.stderr
    assert "Traceback" not in r.stderr
    assert not dst.exists()
    assert staged(dst) == []
