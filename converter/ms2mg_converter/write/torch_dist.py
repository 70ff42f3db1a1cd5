"""The `torch_dist` format: Megatron's distributed checkpoint, written by one process without Megatron.

    iter_0000001/__0_0.distcp    every tensor chunk as its own `torch.save` zip, back to back, then raw bytes
    iter_0000001/.metadata       torch.distributed.checkpoint's `Metadata` (keys, global shapes, chunk spans)
    iter_0000001/common.pt       {args, checkpoint_version 3.0, iteration 1, content_metadata}
    iter_0000001/metadata.json   the "this is torch_dist, and complete" marker (written last)
    latest_checkpointed_iteration.txt   "1"

Every tensor is stored whole (TP 1) under Megatron's sharded key, layers stacked and stored as one chunk
per layer (`plan.dist`), so Megatron reshards it to any TP/PP/VPP on load. The data file is streamed
exactly as the torch writer streams its rank files (same chunk pool, writer and hasher threads, sha256 on
the fly): each chunk's zip records are `data.pkl`, then the tensor's bytes cast chunk by chunk from the
mapped source. torch is imported only at the end, to pickle the `.metadata` with DCP's own classes
(torch-dist-format.md §4.1, §9).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
from pathlib import Path

from ms2mg_converter.config import CkptFormat
from ms2mg_converter.plan import DTYPE_BYTES, ITERATION_DIR, TRACKER, Plan, TensorEntry
from ms2mg_converter.plan.dist import (
    COMMON,
    CONFIG,
    CONFIG_JSON,
    CONTENT_METADATA,
    DIST_FILE,
    METADATA,
    DistBytes,
    DistChunk,
    dist_item,
)
from ms2mg_converter.stream.reader import WriterStopped, produce
from ms2mg_converter.write.base import ProgressFn, StreamingRun, Writer, register, write_synced
from ms2mg_converter.write.filewriter import FileWriterThread, WrittenFile
from ms2mg_converter.write.torchpickle import TensorRef, dumps
from ms2mg_converter.write.zipwriter import ZipStreamWriter

ARCHIVE = "archive"
_HEAD = ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"))


def _serialization_id(name: str) -> bytes:
    digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
    return f"{digest % 10**40:040d}".encode()


def torch_save_bytes(obj: object, name: str, archive: str = ARCHIVE) -> bytes:
    """`torch.save(obj)` of an object without tensors, as bytes (made without torch)."""
    out = io.BytesIO()
    z = ZipStreamWriter(out)
    z.add(f"{archive}/data.pkl", dumps(obj))
    for rec, data in _HEAD:
        z.add(f"{archive}/{rec}", data)
    z.add(f"{archive}/version", b"3\n")
    z.add(f"{archive}/.data/serialization_id", _serialization_id(name))
    z.close()
    return out.getvalue()


EXTRA_STATE = torch_save_bytes([None], "extra_state")
"""An `_extra_state` byte entry: `torch.save([None])`, as Megatron stores a ShardedObject list."""


class _Run(StreamingRun):
    """Streaming the data file: the chunk pool, the finite check and the progress counters."""

    def write_all(self) -> tuple[WrittenFile, list[tuple[DistChunk | DistBytes, tuple[int, int]]]]:
        (fp,) = self.plan.files
        path = self.root / fp.path
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = FileWriterThread(self.pool, self.abort)
        items: list[DistChunk | DistBytes] = []
        try:
            writer.open_segmented(path)
            for group in fp.groups:
                for e in group.entries:
                    item = dist_item(e, self.plan.arch.num_layers)
                    items.append(item)
                    if isinstance(item, DistBytes):
                        writer.raw(EXTRA_STATE)
                    else:
                        self._chunk(item, writer)
                self.done += 1
                self.progress(self.done, self.plan.total_groups, self.bytes)
            writer.close_file()
            (written,) = writer.finish()
        except WriterStopped:
            writer.shutdown()
            writer.raise_error()
            raise
        except BaseException:
            writer.shutdown()
            raise
        return written, list(zip(items, writer.segments(path), strict=True))

    def _chunk(self, item: DistChunk, w: FileWriterThread) -> None:
        e: TensorEntry = item.entry
        w.archive()
        w.record(f"{ARCHIVE}/data.pkl", dumps(TensorRef("0", e.dtype, item.size)))
        for rec, data in _HEAD:
            w.record(f"{ARCHIVE}/{rec}", data)
        w.begin(f"{ARCHIVE}/data/0", e.nbytes)
        for buf, n in produce(e, self.pool, self.check, self.plan.config.load_root):
            w.chunk(buf, n)
            self.bytes += n * DTYPE_BYTES[e.dtype]
        w.end()
        w.record(f"{ARCHIVE}/version", b"3\n")
        w.record(f"{ARCHIVE}/.data/serialization_id", _serialization_id(f"{item.fqn}{item.offset}"))
        w.archive_end()


def _metadata(plan: Plan, spans: list[tuple[DistChunk | DistBytes, tuple[int, int]]]) -> bytes:
    """DCP's `.metadata` pickle (what `FileSystemWriter.finish` writes), built with torch's own classes."""
    import torch
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.config.dtype.value]
    entries: dict[str, md.TensorStorageMetadata | md.BytesStorageMetadata] = {}
    storage: dict[md.MetadataIndex, _StorageInfo] = {}
    for item, (offset, length) in spans:
        where = _StorageInfo(DIST_FILE, offset, length)
        if isinstance(item, DistBytes):
            entries[item.fqn] = md.BytesStorageMetadata()
            storage[md.MetadataIndex(item.fqn)] = where
            continue
        tensor = entries.setdefault(item.fqn, md.TensorStorageMetadata(
            md.TensorProperties(dtype=dtype), torch.Size(item.global_shape), []))
        assert isinstance(tensor, md.TensorStorageMetadata)
        storage[md.MetadataIndex(item.fqn, torch.Size(item.offset), len(tensor.chunks))] = where
        tensor.chunks.append(md.ChunkStorageMetadata(torch.Size(item.offset), torch.Size(item.size)))
    save_id = hashlib.sha256(plan.files[0].path.encode()).hexdigest()[:32]
    meta = md.Metadata(state_dict_metadata=entries, planner_data=None, storage_data=storage,
                       storage_meta=md.StorageMeta(checkpoint_id=None, save_id=save_id), version="1.0.0")
    return pickle.dumps(meta)


def common_state(plan: Plan) -> dict[str, object]:
    """`common.pt`: what Megatron keeps outside the sharded tensors (torch-dist-format.md §5)."""
    return {"args": argparse.Namespace(**plan.args), "checkpoint_version": 3.0, "iteration": 1,
            "content_metadata": dict(CONTENT_METADATA), "num_floating_point_operations_so_far": 0}


@register
class TorchDistWriter(Writer):
    format = CkptFormat.TORCH_DIST

    def write(self, plan: Plan, root: Path, progress: ProgressFn) -> list[WrittenFile]:
        written, spans = _Run(plan, root, progress).write_all()
        folder = root / ITERATION_DIR
        write_synced(folder / METADATA, _metadata(plan, spans))
        write_synced(folder / COMMON, torch_save_bytes(common_state(plan), "common", "common"))
        write_synced(folder / CONFIG, json.dumps(CONFIG_JSON).encode())  # last: "the checkpoint is complete"
        write_synced(root / TRACKER, b"1")
        return [written]
