"""`ms2mg verify` of a `torch_dist` checkpoint, without Megatron and without trusting the files.

The DCP `.metadata` is unpickled with an allow-list of DCP's own classes (nothing else runs); it must hold
exactly Megatron's keys, global shapes, dtype and per-layer chunks (`plan.dist`). Every chunk's
`torch.save` archive inside `__0_0.distcp` is opened where it lies (restricted unpickler, data mapped) and
compared with the source (`expected.py`), every byte entry must be `[None]`, and `common.pt`,
`metadata.json` and the tracker must be what Megatron reads.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from ms2mg_converter.plan import ITERATION_DIR, TRACKER, Plan
from ms2mg_converter.plan.dist import (
    COMMON,
    CONFIG,
    CONFIG_JSON,
    CONTENT_METADATA,
    DIST_FILE,
    METADATA,
    DistBytes,
    DistChunk,
    dist_items,
)
from ms2mg_converter.verify.ckptfile import StoredTensor, peek, peek_segment
from ms2mg_converter.verify.expected import TORCH_DTYPES, ExpectedTensors
from ms2mg_converter.write.manifest import FileDigests

_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(_DCP, n): getattr(md, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                           "ChunkStorageMetadata", "TensorProperties", "StorageMeta",
                                           "MetadataIndex", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    **{("torch", n): getattr(torch, n) for n in ("bfloat16", "float16", "float32")},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a .metadata file")
        return found


def read_metadata(path: Path) -> md.Metadata:
    """The DCP `.metadata` of a checkpoint directory, unpickled with DCP's classes only."""
    with path.open("rb") as f:
        meta = _MetadataUnpickler(f).load()
    if not isinstance(meta, md.Metadata):
        raise pickle.UnpicklingError(f"{path}: holds a {type(meta).__name__}, not a DCP Metadata")
    return meta


def _small_files(plan: Plan, folder: Path) -> list[str]:
    from ms2mg_converter.verify.checkpoint import _args_problems, _torch_loads

    problems = []
    config = folder / CONFIG
    if not config.is_file() or json.loads(config.read_text()) != CONFIG_JSON:
        problems.append(f"{config}: missing, or not exactly {json.dumps(CONFIG_JSON)}")
    problem = _torch_loads(folder / COMMON)
    if problem:
        return [*problems, problem]
    common = peek(folder / COMMON).content
    wanted = {"checkpoint_version": 3.0, "iteration": 1, "content_metadata": CONTENT_METADATA}
    problems += [f"{COMMON}: {k} = {common.get(k)!r}, expected {v!r}" for k, v in wanted.items() if common.get(k) != v]
    return problems + _args_problems(plan.files[0], common.get("args"), plan.args)


def _structure(meta: md.Metadata, items: list[DistChunk | DistBytes], dtype: torch.dtype) -> list[str]:
    expected: dict[str, Any] = {}
    for it in items:
        if isinstance(it, DistBytes):
            expected[it.fqn] = "bytes"
        else:
            _, chunks = expected.setdefault(it.fqn, (it.global_shape, []))
            chunks.append((it.offset, it.size))
    got = meta.state_dict_metadata
    if set(got) != set(expected):
        return [f"{METADATA}: keys differ from Megatron's: missing {sorted(set(expected) - set(got))}, "
                f"unexpected {sorted(set(got) - set(expected))}"]
    problems = []
    for fqn, want in expected.items():
        entry = got[fqn]
        if want == "bytes":
            if not isinstance(entry, md.BytesStorageMetadata):
                problems.append(f"{METADATA}: {fqn} should be a byte entry")
            continue
        if not isinstance(entry, md.TensorStorageMetadata):
            problems.append(f"{METADATA}: {fqn} should be a tensor")
            continue
        chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
        if tuple(entry.size) != want[0] or entry.properties.dtype != dtype or chunks != want[1]:
            problems.append(f"{METADATA}: {fqn} is {entry.properties.dtype} {list(entry.size)} in chunks "
                            f"{chunks}, expected {dtype} {list(want[0])} in chunks {want[1]}")
    return problems


def _span(meta: md.Metadata, item: DistChunk | DistBytes) -> tuple[int, int] | str:
    offset = None if isinstance(item, DistBytes) else torch.Size(item.offset)
    info = (meta.storage_data or {}).get(md.MetadataIndex(item.fqn, offset))
    if not isinstance(info, _StorageInfo) or info.relative_path != DIST_FILE or info.transform_descriptors:
        return f"{METADATA}: no plain storage record in {DIST_FILE} for {item.fqn} at {offset}"
    return info.offset, info.length


def _check_item(path: Path, item: DistChunk | DistBytes, span: tuple[int, int], expected: ExpectedTensors,
                dtype: torch.dtype) -> str | None:
    base, length = span
    if isinstance(item, DistBytes):
        with path.open("rb") as f:
            f.seek(base)
            value = torch.load(io.BytesIO(f.read(length)), map_location="cpu", weights_only=True)
        return None if value == [None] else f"{item.fqn}: holds {value!r}, expected [None]"
    rf = peek_segment(path, base, length)
    stored = rf.content[""]
    if not isinstance(stored, StoredTensor) or stored.shape != item.size or stored.dtype != dtype:
        return f"{item.fqn} at {item.offset}: stored {stored!r}, expected {dtype} {list(item.size)}"
    with rf.tensor(stored) as got:
        bad = expected.mismatch(item.entry, 0, got[0] if len(item.size) > len(item.entry.shape) else got)
    return None if bad is None else f"{item.fqn} at {item.offset} ({item.entry.key}): {bad}"


def verify_dist_files(plan: Plan, root: Path, report: Any, digests: FileDigests | None) -> None:
    """Check a torch_dist checkpoint under `root`; problems go to `report` (a `VerifyReport`)."""
    (fp,) = plan.files
    folder, path = root / ITERATION_DIR, root / fp.path
    tracker = root / TRACKER
    if not tracker.is_file() or tracker.read_text().strip() != "1":
        report.problems.append(f"{tracker}: missing, or not the iteration number 1")
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if names != {DIST_FILE, METADATA, COMMON, CONFIG}:
        report.problems.append(f"{folder}: holds {sorted(names)}, expected {[DIST_FILE, METADATA, COMMON, CONFIG]}")
        return
    report.problems += _small_files(plan, folder)
    try:
        meta = read_metadata(folder / METADATA)
    except Exception as e:  # noqa: BLE001 - reported as a finding
        report.problems.append(f"{folder / METADATA}: cannot be read as DCP metadata: {e}")
        return
    dtype = TORCH_DTYPES[plan.config.dtype]
    items = dist_items(fp, plan.arch.num_layers)
    structure = _structure(meta, items, dtype)
    report.problems += structure
    if structure:
        return
    _compare(plan, path, meta, items, report, dtype)
    if digests is not None:
        if fp.path not in digests.expected:
            report.problems.append(f"{fp.path}: not in the manifest, so its sha256 cannot be checked")
        report.problems += digests.problems()


def _compare(plan: Plan, path: Path, meta: md.Metadata, items: list[DistChunk | DistBytes], report: Any,
             dtype: torch.dtype) -> None:
    expected = ExpectedTensors(plan)
    report.files += 1
    for item in items:
        span = _span(meta, item)
        if isinstance(span, str):
            report.problems.append(span)
            continue
        try:
            bad = _check_item(path, item, span, expected, dtype)
        except Exception as e:  # noqa: BLE001 - a damaged item (bad zip, CRC, pickle) is a finding
            bad = f"{item.fqn}: cannot be read from {DIST_FILE}: {e}"
        if bad:
            report.problems.append(f"{fp_name(plan)}: {bad}")
        elif isinstance(item, DistChunk):
            report.tensors += 1
            report.bytes += item.entry.nbytes


def fp_name(plan: Plan) -> str:
    return plan.files[0].path
