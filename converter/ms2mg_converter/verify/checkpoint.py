"""`ms2mg verify`: check a written checkpoint against its source, independently of the writing path.

For every rank file: torch's own loader must accept it (`torch.load(weights_only=True)`, with only
`argparse.Namespace` allow-listed); the restricted reader (`ckptfile.py`) must find exactly the expected
keys, shapes, dtypes, `args` and `_extra_state` entries; and every tensor must equal the source tensor
transformed the way Megatron's tools would (`reference_ops.py`: torch view/split/cat/chunk, written apart
from the row maps the converter executes), cast with torch. The source is read with the `safetensors`
library. Memory stays at a few blocks or one fused tensor: big tensors are compared in row blocks.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ms2mg_converter.config import CkptFormat
from ms2mg_converter.model.megatron_args import TorchGlobal
from ms2mg_converter.plan import TRACKER, Chunk, ExtraEntry, FilePlan, Plan, TensorEntry
from ms2mg_converter.verify.ckptfile import RankFile, StoredTensor, TorchName, peek
from ms2mg_converter.verify.expected import TORCH_DTYPES, ExpectedTensors
from ms2mg_converter.write.manifest import FileDigests


@dataclass
class VerifyReport:
    files: int = 0
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _args_problems(fp: FilePlan, args: object, expected: dict[str, object]) -> list[str]:
    if not isinstance(args, argparse.Namespace):
        return [f"{fp.path}: 'args' is {type(args).__name__}, not argparse.Namespace"]
    problems = []
    for name, value in expected.items():
        got = getattr(args, name, "<missing>")
        if isinstance(value, TorchGlobal):
            value = TorchName(value.name)
        if got != value:
            problems.append(f"{fp.path}: args.{name} = {got!r}, expected {value!r}")
    return problems


def _structure(fp: FilePlan, rf: RankFile, plan: Plan) -> list[str]:
    c = rf.content
    problems = [f"{fp.path}: {k} = {c.get(k)!r}, expected {v!r}"
                for k, v in (("checkpoint_version", 3.0), ("iteration", 1)) if c.get(k) != v]
    problems += _args_problems(fp, c.get("args"), plan.args)
    stored = sorted(k for k in c if k.startswith("model"))
    if stored != sorted(chunk.key for chunk in fp.chunks):
        return [*problems, f"{fp.path}: holds the model state dicts {stored}, expected "
                           f"{[chunk.key for chunk in fp.chunks]}"]
    for chunk in fp.chunks:
        problems += _chunk_structure(fp, chunk, c[chunk.key])
    return problems


def _chunk_structure(fp: FilePlan, chunk: Chunk, model: object) -> list[str]:
    where = f"{fp.path}: {chunk.key}"
    expected = [e.key for e in chunk.entries()]
    if not isinstance(model, dict) or list(model) != expected:
        got = list(model) if isinstance(model, dict) else model
        return [f"{where}: keys differ from Megatron's: expected {expected}, got {got}"]
    problems = []
    for e in chunk.entries():
        value = model[e.key]
        if isinstance(e, ExtraEntry):
            if value is not None:
                problems.append(f"{where}: {e.key} should be None")
        elif not isinstance(value, StoredTensor):
            problems.append(f"{where}: {e.key} is not a tensor")
        elif value.shape != e.shape or value.dtype != TORCH_DTYPES[e.dtype]:
            problems.append(f"{where}: {e.key} is {value.dtype} {list(value.shape)}, expected "
                            f"{TORCH_DTYPES[e.dtype]} {list(e.shape)}")
    return problems


def _torch_loads(path: Path) -> str | None:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - reported as a finding
        return f"{path}: torch.load(weights_only=True) fails: {e}"
    return None


def verify_files(plan: Plan, root: Path, report: VerifyReport, digests: FileDigests | None) -> None:
    if plan.config.ckpt_format is CkptFormat.TORCH_DIST:
        from ms2mg_converter.verify.distckpt import verify_dist_files

        verify_dist_files(plan, root, report, digests)
        return
    expected = ExpectedTensors(plan)
    tracker = root / TRACKER
    if not tracker.is_file() or tracker.read_text().strip() != "1":
        report.problems.append(f"{tracker}: missing, or not the iteration number 1")
    found = {p.relative_to(root).as_posix() for p in root.glob("iter_*/mp_rank_*/model_optim_rng.pt")}
    if found != {fp.path for fp in plan.files}:
        report.problems.append(f"rank files differ from the plan: {sorted(found ^ {fp.path for fp in plan.files})}")
    threads = _Threads(digests)
    for fp in plan.files:
        if (root / fp.path).is_file():
            _check_file(fp, root / fp.path, plan, expected, report, threads)
    if digests is not None:
        report.problems += [f"{fp.path}: not in the manifest, so its sha256 cannot be checked"
                            for fp in plan.files if fp.path not in digests.expected]
        report.problems += digests.problems()


class _Threads:
    """Torch gets one thread while the sha256 thread needs the other core, and all of them once the hashing is
    done (with torch's default 2 threads beside the hashing, the comparisons took 2.0 s instead of 1.4 s on
    bench-1b; without the hashing, 2 threads compare TP1/PP1 bench-1b in 0.63 s instead of 0.86 s)."""

    def __init__(self, digests: FileDigests | None) -> None:
        self.digests = digests
        self.full = torch.get_num_threads()
        self.narrow = digests is not None and self.full > 1
        torch.set_num_threads(1 if self.narrow else self.full)

    def widen_when_hashed(self) -> None:
        if self.narrow and self.digests is not None and self.digests.done():
            torch.set_num_threads(self.full)
            self.narrow = False


def _check_file(fp: FilePlan, path: Path, plan: Plan, expected: ExpectedTensors, report: VerifyReport,
                threads: _Threads) -> None:
    report.files += 1
    problem = _torch_loads(path)
    if problem:
        report.problems.append(problem)
        return
    rf = peek(path)
    structure = _structure(fp, rf, plan)
    report.problems += structure
    if not structure:
        _compare_tensors(fp, rf, expected, report, threads)


def _compare_tensors(fp: FilePlan, rf: RankFile, expected: ExpectedTensors, report: VerifyReport,
                     threads: _Threads) -> None:
    for model, entry in fp.chunk_entries():
        if not isinstance(entry, TensorEntry):
            continue
        threads.widen_when_hashed()
        stored = rf.content[model][entry.key]
        with rf.tensor(stored) as got:
            bad = expected.mismatch(entry, fp.tp_rank, got)
        report.tensors += 1
        report.bytes += entry.nbytes
        if bad:
            report.problems.append(f"{fp.path}: {model}: {entry.key}: {bad}")


def verify_checkpoint(plan: Plan, root: Path, digests: FileDigests | None = None) -> VerifyReport:
    """Check every file under `root` against `plan` and the source (and against the sha256 digests, when
    given; start them before importing this module so that the hashing overlaps with importing torch)."""
    t0 = time.perf_counter()
    report = VerifyReport()
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            verify_files(plan, root, report, digests)
    finally:
        torch.set_num_threads(threads)
    report.seconds = time.perf_counter() - t0
    return report
