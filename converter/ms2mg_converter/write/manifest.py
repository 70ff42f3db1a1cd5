"""`ms2mg-manifest.json`: what was converted, how, and the sha256 of every file written.

Written into the checkpoint directory last, before the directory is moved into place, so a checkpoint
with a manifest is complete. `ms2mg verify` checks the files against these hashes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ms2mg_converter import __version__
from ms2mg_converter.config import ConvertConfig
from ms2mg_converter.model.arch import Architecture
from ms2mg_converter.plan import FilePlan, Plan, TensorEntry
from ms2mg_converter.source.fingerprint import SourceFileDigest, content_matches, headers_match

MANIFEST_NAME = "ms2mg-manifest.json"
_HASH_BLOCK = 8 * 1024 * 1024


class OutputFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    bytes: int
    sha256: str
    tensor_parallel_rank: int | None = None
    pipeline_parallel_rank: int | None = None
    expert_parallel_rank: int | None = None
    """Set only with expert parallelism (EP > 1): the rank directory's `_EEE`."""
    tensors: int = 0
    layers: dict[str, list[int]] = {}
    """Global layer numbers per state dict of the file (`model`, or `model0`, `model1`, ... with virtual
    pipeline chunks); inside each state dict they are numbered from 0."""


class SourceSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    files: list[SourceFileDigest]
    tensors: int
    bytes: int
    family: str


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = "ms2mg-manifest/v1"
    converter_version: str = __version__
    created: str
    command: list[str]
    config: ConvertConfig
    source: SourceSummary
    architecture: Architecture
    megatron_args: dict[str, Any]
    dropped_keys: list[str]
    ignored_keys: list[str]
    defaulted: list[str] = []
    """Model facts nothing stated, set to Megatron's defaults (see `model.facts`)."""
    files: list[OutputFile]
    verified: bool
    timings: dict[str, float]


def _args_json(args: dict[str, object]) -> dict[str, Any]:
    return {k: (f"torch.{v.name}" if hasattr(v, "name") and hasattr(v, "module") else v) for k, v in args.items()}


def build_manifest(plan: Plan, command: list[str], outputs: list[OutputFile], verified: bool,
                   timings: dict[str, float], sources: list[SourceFileDigest]) -> Manifest:
    src = plan.source
    return Manifest(
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=command, config=plan.config,
        source=SourceSummary(path=str(plan.config.load_dir), tensors=len(src.tensors), bytes=src.total_bytes,
                             files=sources,
                             family=plan.arch.family),
        architecture=plan.arch, megatron_args=_args_json(plan.args), dropped_keys=list(plan.dropped),
        defaulted=list(plan.arch.defaulted),
        ignored_keys=list(plan.ignored), files=outputs, verified=verified, timings=timings)


def tensor_count(plan: Plan, path: str) -> int:
    fp = next(f for f in plan.files if f.path == path)
    return sum(isinstance(e, TensorEntry) for e in fp.entries())


def chunk_layers(fp: FilePlan) -> dict[str, list[int]]:
    """The manifest's `layers` of a rank file: state dict key -> global layer numbers."""
    return {c.key: list(c.layers) for c in fp.chunks}


def write_manifest(manifest: Manifest, directory: Path) -> Path:
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path) -> Manifest | None:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    return Manifest.model_validate_json(path.read_text(encoding="utf-8"))


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks (hashlib releases the GIL while hashing them).

    Plain reads, not mappings: the kernel's readahead overlaps the disk with the hashing, and mapping windows
    of a file that another thread compares through its own mapping cost 1.8 CPU s more (and 1.2 s of wall
    time) in a verified bench-1b TP1/PP1 conversion.
    """
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class FileDigests:
    """The sha256 of checkpoint files, computed on one background thread from the moment this is created.

    `expected` maps paths relative to `root` to the sha256 they should have, in the order they will be
    compared (hashing reads ahead of the comparisons). Starting early lets the hashing overlap with
    importing torch; leaving the `with` block cancels what has not started.
    """

    def __init__(self, root: Path, expected: dict[str, str]) -> None:
        self.expected = expected
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ms2mg-sha256")
        self._digests = {p: self._pool.submit(file_sha256, root / p) for p in expected if (root / p).is_file()}

    def __enter__(self) -> FileDigests:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def done(self) -> bool:
        return all(digest.done() for digest in self._digests.values())

    def problems(self) -> list[str]:
        """One line per file whose sha256 differs from the expected one (files that are missing are not
        reported here: the caller lists them)."""
        problems = []
        for path, digest in self._digests.items():
            try:
                if digest.result() != self.expected[path]:
                    problems.append(f"{path}: sha256 differs from the manifest (the file changed on disk)")
            except OSError as e:
                problems.append(f"{path}: cannot be read to check its sha256: {e}")
        return problems


def matching_checkpoint(plan: Plan) -> Manifest | None:
    """The manifest at --save-dir when that checkpoint is exactly what `plan` would write, else None.

    Same request (flags other than --overwrite/--verify), same source files, sizes and headers, every output
    file still matching its sha256, and the source's content still matching its recorded digest (a new
    checkpoint at the same path with the same sizes is converted again, not reported as done). This makes a
    rerun of a finished conversion (a retried Job whose pod died after the commit) a success instead of a
    "destination not empty" error.
    """
    dest = plan.config.save_dir
    if dest is None or not (dest / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(dest)
    except ValueError:
        return None
    if manifest is None:
        return None
    ignore = {"overwrite", "verify"}
    if manifest.config.model_dump(exclude=ignore) != plan.config.model_dump(exclude=ignore):
        return None
    if not headers_match(manifest.source.files, plan.source):
        return None
    for f in manifest.files:
        path = dest / f.path
        if not path.is_file() or path.stat().st_size != f.bytes or file_sha256(path) != f.sha256:
            return None
    if not content_matches(manifest.source.files, plan.source, plan.config.source_digest):
        return None
    return manifest
