"""Running a plan: stream every rank file into a staging directory, verify, write the manifest, commit.

Memory is a handful of chunk buffers (`CHUNK_BYTES` each) plus one mapped source tensor at a time,
whatever the model size. Casting runs on the main thread while the writer thread writes, CRCs and hashes
the previous chunk. Any failure removes the staging directory: nothing is left at `--save-dir`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ms2mg_converter.confine import check_destination
from ms2mg_converter.errors import ConversionIOError, VerificationError
from ms2mg_converter.manifest import FileDigests, OutputFile, build_manifest, tensor_count, write_manifest
from ms2mg_converter.plan import TRACKER, ExtraEntry, FilePlan, Plan, TensorEntry
from ms2mg_converter.reader import BufferPool, FiniteCheck, WriterStopped, produce
from ms2mg_converter.staging import Staging
from ms2mg_converter.torchpickle import TensorRef, dumps
from ms2mg_converter.writer import FileWriterThread, WrittenFile

CHUNK_BYTES = 16 * 1024 * 1024
POOL_BUFFERS = 4
ARCHIVE = "model_optim_rng"

ProgressFn = Callable[[int, int, int], None]
"""progress(done_groups, total_groups, bytes_written)."""


@dataclass
class RunStats:
    files: list[WrittenFile]
    bytes: int
    seconds: dict[str, float]
    verified: bool
    stale_removed: list[Path]
    manifest: Path | None = None


def _pickle_for(fp: FilePlan, plan: Plan) -> bytes:
    model: OrderedDict[str, TensorRef | None] = OrderedDict()
    key = 0
    for e in fp.entries():
        if isinstance(e, ExtraEntry):
            model[e.key] = None
        else:
            model[e.key] = TensorRef(str(key), e.dtype, e.shape)
            key += 1
    obj = {"args": argparse.Namespace(**plan.args), "checkpoint_version": 3.0, "iteration": 1, "model": model,
           "num_floating_point_operations_so_far": 0}
    return dumps(obj)


def _serialization_id(fp: FilePlan) -> bytes:
    digest = int(hashlib.sha256(fp.path.encode()).hexdigest(), 16)
    return f"{digest % 10**40:040d}".encode()


class _Run:
    def __init__(self, plan: Plan, root: Path, progress: ProgressFn) -> None:
        self.plan, self.root, self.progress = plan, root, progress
        self.abort = threading.Event()
        self.pool = BufferPool(plan.config.dtype, CHUNK_BYTES, POOL_BUFFERS, self.abort)
        self.check = None if plan.config.allow_nonfinite else FiniteCheck(plan.config.dtype)
        self.done = 0
        self.bytes = 0

    def write_all(self) -> list[WrittenFile]:
        writer = FileWriterThread(self.pool, self.abort)
        try:
            for fp in self.plan.files:
                self._file(fp, writer)
            return writer.finish()
        except WriterStopped:
            writer.shutdown()
            writer.raise_error()
            raise
        except BaseException:
            writer.shutdown()
            raise

    def _file(self, fp: FilePlan, w: FileWriterThread) -> None:
        path = self.root / fp.path
        path.parent.mkdir(parents=True, exist_ok=True)
        w.open(path)
        w.record(f"{ARCHIVE}/data.pkl", _pickle_for(fp, self.plan))
        for name, data in ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little")):
            w.record(f"{ARCHIVE}/{name}", data)
        key = 0
        for group in fp.groups:
            for e in group.entries:
                if isinstance(e, TensorEntry):
                    self._tensor(e, key, w)
                    key += 1
            self.done += 1
            self.progress(self.done, self.plan.total_groups, self.bytes)
        w.record(f"{ARCHIVE}/version", b"3\n")
        w.record(f"{ARCHIVE}/.data/serialization_id", _serialization_id(fp))
        w.close_file()

    def _tensor(self, e: TensorEntry, key: int, w: FileWriterThread) -> None:
        w.begin(f"{ARCHIVE}/data/{key}", e.nbytes)
        itemsize = e.nbytes // max(1, _numel(e.shape)) if e.nbytes else 0
        for buf, n in produce(e, self.pool, self.check, self.plan.config.load_root):
            w.chunk(buf, n)
            self.bytes += n * itemsize
        w.end()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_tracker(root: Path) -> None:
    path = root / TRACKER
    with path.open("w") as f:
        f.write("1")
        f.flush()
        os.fsync(f.fileno())


def _verify(plan: Plan, root: Path, files: list[WrittenFile]) -> float:
    """Check the staged checkpoint: every tensor against the source, and every file read back from the disk
    against the sha256 computed while it was written (which also reads ahead for the comparisons)."""
    from ms2mg_converter.verify import verify_checkpoint

    hashes = {f.path.relative_to(root).as_posix(): f.sha256 for f in files}
    with FileDigests(root, hashes) as digests:
        report = verify_checkpoint(plan, root, digests)
    if not report.ok:
        shown = "\n  ".join(report.problems[:20])
        raise VerificationError(f"the written checkpoint does not match the source ({len(report.problems)} "
                                f"problem(s)); nothing was written to --save-dir:\n  {shown}")
    return report.seconds


def run_plan(plan: Plan, command: list[str], progress: ProgressFn) -> RunStats:
    """Write, verify and commit the checkpoint described by `plan` (raises `ConversionError`s)."""
    assert plan.config.save_dir is not None
    check_destination(plan.config.save_dir, plan.config.save_root)
    staging = Staging(plan.config.save_dir, plan.config.overwrite, plan.config.save_root)
    staging.check_destination()
    timings: dict[str, float] = {}
    try:
        stale = staging.create()
        t0 = time.perf_counter()
        files = _Run(plan, staging.path, progress).write_all()
        _write_tracker(staging.path)
        timings["write"] = time.perf_counter() - t0
        if plan.config.verify:
            timings["verify"] = _verify(plan, staging.path, files)
        outputs = [OutputFile(path=f.path.relative_to(staging.path).as_posix(), bytes=f.bytes, sha256=f.sha256,
                              tensor_parallel_rank=fp.tp_rank, pipeline_parallel_rank=fp.pp_rank,
                              tensors=tensor_count(plan, fp.path)) for f, fp in zip(files, plan.files, strict=True)]
        manifest = build_manifest(plan, command, outputs, plan.config.verify, timings)
        write_manifest(manifest, staging.path)
        staging.commit()
    except OSError as e:
        staging.abort()
        raise ConversionIOError(f"I/O error while writing the checkpoint ({e.strerror or e}"
                                f"{': ' + str(e.filename) if e.filename else ''}); nothing was written to "
                                f"--save-dir {plan.config.save_dir}. Check free space and the file system.") from e
    except BaseException:
        staging.abort()
        raise
    total = sum(f.bytes for f in files)
    return RunStats(files, total, timings, plan.config.verify, stale, plan.config.save_dir / "ms2mg-manifest.json")
