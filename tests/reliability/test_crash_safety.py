"""Crash safety: SIGKILL the converter at many points, then check the destination and that a rerun recovers.

Two ways of choosing the moment:

* by bytes written: the test polls the size of the staging directory and kills the process once it passes
  k/20 of the output's size (k = 1..20; k = 20 lands after the last byte, during verification), on a
  fresh destination and while replacing an earlier checkpoint with `--overwrite`;
* at every step of the commit: a fault injected into the converter process kills it (SIGKILL, from
  inside) just before or after each file-system operation of `Staging.commit`, for a fresh destination,
  for `--overwrite` with `renameat2(RENAME_EXCHANGE)`, and for the two-rename fallback used where the file
  system lacks RENAME_EXCHANGE.

After every kill the destination must be absent or a complete checkpoint that `ms2mg verify` accepts (the
earlier one or the new one, never a mixture); after a kill in the fallback's window the earlier checkpoint
must be intact beside it. Then the same command is run again: it must succeed, remove (and report) what
the killed run left, and leave nothing beside the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from ms2mg_converter.demo.sample import SampleSpec, build_sample
from tests.reliability.conftest import record
from tests.reliability.corpus import flags_for, world_dir

pytestmark = pytest.mark.slow

KILLS = 20
STALE_MESSAGE = "removed the staging directory of an earlier, interrupted run"
MEDIUM = SampleSpec(num_layers=8, hidden_size=384, ffn_hidden_size=1024, vocab_size=8000)
SMALL = SampleSpec()


@dataclass
class Sample:
    src: Path
    flags: list[str]
    old: Path
    """A complete TP1/PP1 conversion of `src`: the "earlier checkpoint" that --overwrite replaces."""
    output_bytes: int
    """Bytes of the TP2/PP2 rank files the new conversion writes."""


def convert_cmd(s: Sample, dst: Path, *extra: str, inject: str = "") -> list[str]:
    args = ["convert", "--load-dir", str(s.src), "--save-dir", str(dst), *s.flags, "--progress", "none", *extra]
    if inject:
        code = inject + "\nimport sys\nfrom ms2mg_converter.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
        return [sys.executable, "-c", code, *args]
    return [sys.executable, "-m", "ms2mg_converter", *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def verify(s: Sample, dst: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "ms2mg_converter", "verify", "--load-dir", str(s.src), "--save-dir", str(dst)])


def tp_of(dst: Path) -> int:
    return int(json.loads((dst / "ms2mg-manifest.json").read_text())["config"]["tensor_parallel"])


def siblings(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.ms2mg-"))


def staged_bytes(dst: Path) -> int:
    total = 0
    for d in dst.parent.glob(f".{dst.name}.ms2mg-staging-*"):
        for root, _, files in os.walk(d):
            for f in files:
                with contextlib.suppress(FileNotFoundError):  # the run is removing or renaming it
                    total += os.stat(os.path.join(root, f)).st_size
    return total


def _make(root: Path, spec: SampleSpec) -> Sample:
    src = root / "src"
    build_sample(spec, src)
    flags = [*flags_for(spec), "--true-vocab-size", str(spec.vocab_size)]
    s = Sample(src, flags, root / "old", 0)
    r = run(convert_cmd(s, s.old))  # TP1/PP1: the earlier checkpoint
    assert r.returncode == 0, r.stderr
    probe = root / "probe"
    r = run(convert_cmd(s, probe, "--tp", "2", "--pp", "2", "--no-verify"))
    assert r.returncode == 0, r.stderr
    s.output_bytes = sum(p.stat().st_size for p in probe.rglob("model_optim_rng.pt"))
    shutil.rmtree(probe)
    return s


@pytest.fixture(scope="module")
def medium() -> Iterator[Sample]:
    with world_dir("ms2mg-crash-") as root:
        yield _make(root, MEDIUM)


@pytest.fixture(scope="module")
def small() -> Iterator[Sample]:
    with world_dir("ms2mg-crash-") as root:
        yield _make(root, SMALL)


@dataclass
class Kill:
    point: str
    killed_at_bytes: int
    seconds_to_kill: float
    destination: str
    """absent | earlier (the --overwrite target, verified) | new (verified)"""
    left_beside: list[str]
    rerun_seconds: float
    rerun_reported: list[str]


def _check_after_kill(s: Sample, dst: Path, overwrite: bool) -> str:
    if not dst.exists():
        return "absent"
    r = verify(s, dst)
    assert r.returncode == 0, f"the destination is not a complete checkpoint after the kill:\n{r.stdout}{r.stderr}"
    state = "new" if tp_of(dst) == 2 else "earlier"
    assert overwrite or state == "new"
    return state


def _rerun(s: Sample, dst: Path, extra: list[str], left: list[str], state: str) -> tuple[float, list[str]]:
    """Run the killed command again; it must succeed and clean up. Where the killed run had already put its
    checkpoint in place (killed after the commit's rename), a rerun without --overwrite finds that exact
    conversion there and succeeds without writing (AlreadyConverted), as a retried Job must."""
    t0 = time.perf_counter()
    r = run(convert_cmd(s, dst, *extra))
    seconds = time.perf_counter() - t0
    if state == "new" and "--overwrite" not in extra:
        assert "already holds this exact conversion" in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    reported = [line for line in r.stderr.splitlines() if "earlier" in line or "interrupted" in line]
    if any(".ms2mg-staging-" in name for name in left):
        assert STALE_MESSAGE in r.stderr, r.stderr
    assert siblings(dst) == [], f"left beside the destination after the rerun: {siblings(dst)}"
    assert tp_of(dst) == 2
    assert json.loads((dst / "ms2mg-manifest.json").read_text())["verified"] is True
    return seconds, reported


def _kill_by_bytes(s: Sample, dst: Path, k: int, extra: list[str]) -> tuple[int, float]:
    threshold = s.output_bytes * k // KILLS
    t0 = time.perf_counter()
    p = subprocess.Popen(convert_cmd(s, dst, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = 0
    while p.poll() is None:
        seen = max(seen, staged_bytes(dst))
        if seen >= threshold:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    p.wait(timeout=60)
    return seen, time.perf_counter() - t0


@pytest.mark.parametrize("io", ["buffered", "direct"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh-destination", "overwrite"])
def test_sigkill_by_bytes_written(medium: Sample, overwrite: bool, io: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL at points spread over the bytes written. With page-cache writes (MS2MG_DIRECT_IO=0) the files grow
    smoothly and 20 points are distinct; with O_DIRECT (the default where the file system allows it) they grow in
    8 MiB steps, so fewer, coarser points are used."""
    s = medium
    monkeypatch.setenv("MS2MG_DIRECT_IO", "0" if io == "buffered" else "1")
    extra = ["--tp", "2", "--pp", "2", *(["--overwrite"] if overwrite else [])]
    kills: list[Kill] = []
    step = (1 if not overwrite else 3) if io == "buffered" else (4 if not overwrite else 6)
    points = range(1 if not overwrite else 2, KILLS + 1, step)
    with world_dir("ms2mg-crash-run-") as root:
        dst = root / "out"
        for k in points:
            if dst.exists():
                shutil.rmtree(dst)
            if overwrite:
                shutil.copytree(s.old, dst)
            at, seconds = _kill_by_bytes(s, dst, k, extra)
            state = _check_after_kill(s, dst, overwrite)
            if overwrite and state == "earlier":
                assert (dst / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").is_file()
            left = siblings(dst)
            rerun_s, reported = _rerun(s, dst, extra, left, state)
            kills.append(Kill(f"{k}/{KILLS} of {s.output_bytes} bytes", at, round(seconds, 3), state, left,
                              round(rerun_s, 2), reported))
    record(f"crash_bytes_{'overwrite' if overwrite else 'fresh'}_{io}", [asdict(x) for x in kills])
    print("\n".join(f"{x.point}: killed at {x.killed_at_bytes} B, destination {x.destination}, left "
                    f"{len(x.left_beside)}, rerun {x.rerun_seconds} s" for x in kills))
    table = "\n".join(f"{x.point}: {x.killed_at_bytes} B, {x.destination}" for x in kills)
    at_bytes = [x.killed_at_bytes for x in kills]
    assert all(b >= s.output_bytes * k // KILLS for b, k in zip(at_bytes, points, strict=True)), table
    if io == "buffered":
        assert len(set(at_bytes)) >= len(at_bytes) * 3 // 4, f"the kill points are not spread out:\n{table}"
    else:
        assert len(set(at_bytes)) >= 3, f"the kill points are not spread out:\n{table}"
    # before the last byte the destination is untouched; after it the run may have committed
    assert all(x.destination == ("earlier" if overwrite else "absent") or x.point.startswith(f"{KILLS}/")
               for x in kills), table


# --- kills at each step of the commit (fault injection inside the converter process) -------------------

INJECT = """
import os, shutil, signal
from ms2mg_converter.write import staging as st
AT, WHEN, FALLBACK = {at}, {when!r}, {fallback}
events = []
def wrap(owner, name, label):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        if not st.shielded():
            return original(*args, **kwargs)
        events.append(label)
        n = len(events)
        if n == AT and WHEN == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if n == AT and WHEN == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapper)
if FALLBACK:
    st._renameat2_exchange = lambda a, b: False
else:
    wrap(st, "_renameat2_exchange", "exchange")
wrap(st, "_fsync_tree", "fsync")
wrap(os, "rename", "rename")
wrap(os, "unlink", "unlink")
wrap(shutil, "rmtree", "rmtree")
"""

COMMIT_STEPS = {
    # mode: the commit's file-system operations in order (fsync of the tree first)
    "fresh": ["fsync", "rename", "unlink", "rmtree"],
    "exchange": ["fsync", "exchange", "unlink", "rmtree"],
    "fallback": ["fsync", "rename", "rename", "unlink", "rmtree"],
}


def _commit_points() -> list[tuple[str, int, str]]:
    points = []
    for mode, steps in COMMIT_STEPS.items():
        points += [(mode, i, "before") for i in range(1, len(steps) + 1)]
        points.append((mode, len(steps), "after"))
    return points


@pytest.mark.parametrize(("mode", "at", "when"), _commit_points(),
                         ids=[f"{m}-{w}-{COMMIT_STEPS[m][a - 1]}{a}" for m, a, w in _commit_points()])
def test_sigkill_during_commit(small: Sample, mode: str, at: int, when: str) -> None:
    s = small
    overwrite = mode != "fresh"
    extra = ["--tp", "2", "--pp", "2", *(["--overwrite"] if overwrite else [])]
    with world_dir("ms2mg-commit-") as root:
        dst = root / "out"
        if overwrite:
            shutil.copytree(s.old, dst)
        inject = INJECT.format(at=at, when=when, fallback=mode == "fallback")
        t0 = time.perf_counter()
        r = run(convert_cmd(s, dst, *extra, inject=inject))
        seconds = time.perf_counter() - t0
        assert r.returncode == -signal.SIGKILL, f"the injected kill did not happen: {r.returncode}\n{r.stderr}"
        left = siblings(dst)
        olds = [root / n for n in left if ".ms2mg-old-" in n]
        if not dst.exists() and overwrite:
            # only in the fallback's window between its two renames: the earlier checkpoint is beside it
            assert (mode, at, when) in (("fallback", 2, "after"), ("fallback", 3, "before")), left
            assert len(olds) == 1 and verify(s, olds[0]).returncode == 0 and tp_of(olds[0]) == 1
            state = "absent (earlier checkpoint intact beside it)"
        else:
            state = _check_after_kill(s, dst, overwrite)
            assert overwrite or state in ("absent", "new")
        if (mode, at, when) == ("fallback", 2, "after"):
            # a rerun *without* --overwrite puts the earlier checkpoint back, then refuses to replace it
            r2 = run(convert_cmd(s, dst, "--tp", "2", "--pp", "2"))
            assert r2.returncode == 4 and "restored the checkpoint" in r2.stderr, r2.stderr
            assert tp_of(dst) == 1 and verify(s, dst).returncode == 0
        rerun_s, reported = _rerun(s, dst, extra, left, state)
    kill = Kill(f"{mode}: {when} {COMMIT_STEPS[mode][at - 1]} (step {at})", -1, round(seconds, 3), state, left,
                round(rerun_s, 2), reported)
    name = f"crash_commit_{mode}_{at}_{when}"
    record(name, asdict(kill))


# --- signals and a second run during the commit ---------------------------------------------------------

SIGTERM_IN_COMMIT = """
import os, signal
from ms2mg_converter.write import staging as st
_fsync_tree = st._fsync_tree
def fsync_tree(path):
    os.kill(os.getpid(), signal.SIGTERM)  # as kubelet would, while the commit runs
    return _fsync_tree(path)
st._fsync_tree = fsync_tree
"""


def test_sigterm_during_commit_finishes_the_commit(small: Sample) -> None:
    """Once the swap has begun a SIGTERM no longer stops the run: the checkpoint lands, the exit code is 0."""
    with world_dir("ms2mg-commit-") as root:
        dst = root / "out"
        r = run(convert_cmd(small, dst, "--tp", "2", inject=SIGTERM_IN_COMMIT))
        assert r.returncode == 0, r.stderr
        assert "SIGTERM received while the checkpoint is being committed" in r.stderr
        assert verify(small, dst).returncode == 0 and siblings(dst) == []


SLOW_COMMIT = """
import time
from ms2mg_converter.write import staging as st
_fsync_tree = st._fsync_tree
def fsync_tree(path):
    time.sleep(4)  # hold the commit open (lock held, staging directory complete)
    return _fsync_tree(path)
st._fsync_tree = fsync_tree
"""


def test_a_second_run_never_takes_a_committing_run_for_a_stale_one(small: Sample) -> None:
    """Run B starts while run A is inside its commit: B must not delete A's staging directory. Exactly one
    of them puts its checkpoint in place; the other is refused (exit 4) and removes only its own files, or,
    when it looks only after A's commit finished, finds A's identical checkpoint (AlreadyConverted, exit 0)."""
    with world_dir("ms2mg-commit-") as root:
        dst = root / "out"
        a = subprocess.Popen(convert_cmd(small, dst, "--tp", "2", inject=SLOW_COMMIT), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not any((p / "ms2mg-manifest.json").is_file() for p in root.glob(".out.ms2mg-staging-*")):
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.01)
        b = run(convert_cmd(small, dst, "--tp", "2"))
        _, a_err = a.communicate(timeout=120)
        codes = sorted((a.returncode, b.returncode))
        if codes == [0, 0]:  # B planned after A's commit: nothing written by B, A's files match
            assert "already holds this exact conversion" in b.stderr, (a_err, b.stderr)
        else:
            assert codes == [0, 4], (a_err, b.stderr)
            loser = a_err if a.returncode == 4 else b.stderr
            assert "not empty" in loser and "Traceback" not in loser
        assert STALE_MESSAGE not in b.stderr
        assert verify(small, dst).returncode == 0 and siblings(dst) == []
