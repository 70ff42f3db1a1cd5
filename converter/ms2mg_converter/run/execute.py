"""Running a plan: the format's writer fills a staging directory, then verify, manifest, commit.

The same for every output format (`write.base.Writer`, chosen by `--ckpt-format`). Any failure removes
the staging directory: nothing is left at `--save-dir`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ms2mg_converter.confine import check_destination
from ms2mg_converter.errors import ConversionIOError, VerificationError
from ms2mg_converter.plan import Plan
from ms2mg_converter.source.fingerprint import SourceFingerprint
from ms2mg_converter.write import ProgressFn, WrittenFile, writer_for
from ms2mg_converter.write.manifest import (
    FileDigests,
    OutputFile,
    build_manifest,
    chunk_layers,
    tensor_count,
    write_manifest,
)
from ms2mg_converter.write.staging import Staging


@dataclass
class RunStats:
    files: list[WrittenFile]
    bytes: int
    seconds: dict[str, float]
    verified: bool
    stale_removed: list[Path]
    manifest: Path | None = None


def _verify(plan: Plan, root: Path, files: list[WrittenFile]) -> float:
    """Check the staged checkpoint: every tensor against the source, and every file read back from the disk
    against the sha256 computed while it was written (which also reads ahead for the comparisons)."""
    from ms2mg_converter.verify.checkpoint import verify_checkpoint

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
    fingerprint = SourceFingerprint(plan.source, plan.config.source_digest)
    try:
        stale = staging.create()
        t0 = time.perf_counter()
        files = writer_for(plan.config.ckpt_format).write(plan, staging.path, progress)
        timings["write"] = time.perf_counter() - t0
        if plan.config.verify:
            timings["verify"] = _verify(plan, staging.path, files)
        outputs = [OutputFile(path=f.path.relative_to(staging.path).as_posix(), bytes=f.bytes, sha256=f.sha256,
                              tensor_parallel_rank=fp.tp_rank, pipeline_parallel_rank=fp.pp_rank,
                              expert_parallel_rank=fp.ep_rank if plan.config.moe.expert_parallel > 1 else None,
                              tensors=tensor_count(plan, fp.path), layers=chunk_layers(fp))
                   for f, fp in zip(files, plan.files, strict=True)]
        t0 = time.perf_counter()
        sources = fingerprint.result()
        timings["source_digest_wait"] = time.perf_counter() - t0
        manifest = build_manifest(plan, command, outputs, plan.config.verify, timings, sources)
        write_manifest(manifest, staging.path)
        staging.commit()
    except OSError as e:
        fingerprint.cancel()
        staging.abort()
        raise ConversionIOError(f"I/O error while writing the checkpoint ({e.strerror or e}"
                                f"{': ' + str(e.filename) if e.filename else ''}); nothing was written to "
                                f"--save-dir {plan.config.save_dir}. Check free space and the file system.") from e
    except BaseException:
        fingerprint.cancel()
        staging.abort()
        raise
    total = sum(f.bytes for f in files)
    return RunStats(files, total, timings, plan.config.verify, stale, plan.config.save_dir / "ms2mg-manifest.json")
