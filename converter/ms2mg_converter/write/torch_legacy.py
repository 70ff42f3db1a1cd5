"""The legacy `torch` format: iter_0000001/mp_rank_XX[_YYY]/model_optim_rng.pt, one torch.save file per rank.

Each rank file is streamed without torch: `data.pkl` first (all shapes are known from the plan), then
every tensor record in chunks cast from memory-mapped source rows, CRC-32 and sha256 computed on the way.
Memory is a handful of chunk buffers (`CHUNK_BYTES` each) plus one mapped source window per input,
whatever the model size. Casting runs on the main thread while the writer thread writes, CRCs and hashes
the previous chunk.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import OrderedDict
from pathlib import Path

from ms2mg_converter.config import CkptFormat
from ms2mg_converter.plan import TRACKER, ExtraEntry, FilePlan, Plan, TensorEntry
from ms2mg_converter.stream.reader import WriterStopped, produce
from ms2mg_converter.write.base import ProgressFn, StreamingRun, Writer, register, write_synced
from ms2mg_converter.write.filewriter import FileWriterThread, WrittenFile
from ms2mg_converter.write.torchpickle import TensorRef, dumps

ARCHIVE = "model_optim_rng"


def _pickle_for(fp: FilePlan, plan: Plan) -> bytes:
    """The rank file's top-level dict, as Megatron-LM's `generate_state_dict` builds it: `args`,
    `checkpoint_version`, `iteration`, then one state dict per model chunk (`model`, or `model0`, `model1`,
    ... with virtual pipeline chunks). Storage keys count up through the file in the order the tensors are
    streamed (`_Run._file`)."""
    obj: dict[str, object] = {"args": argparse.Namespace(**plan.args), "checkpoint_version": 3.0, "iteration": 1}
    key = 0
    for chunk in fp.chunks:
        model: OrderedDict[str, TensorRef | None] = OrderedDict()
        for e in chunk.entries():
            if isinstance(e, ExtraEntry):
                model[e.key] = None
            else:
                model[e.key] = TensorRef(str(key), e.dtype, e.shape)
                key += 1
        obj[chunk.key] = model
    obj["num_floating_point_operations_so_far"] = 0
    return dumps(obj)


def _serialization_id(fp: FilePlan) -> bytes:
    digest = int(hashlib.sha256(fp.path.encode()).hexdigest(), 16)
    return f"{digest % 10**40:040d}".encode()


class _Run(StreamingRun):
    """One conversion's writing state: the chunk pool, the finite check and the progress counters."""

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


@register
class TorchWriter(Writer):
    format = CkptFormat.TORCH

    def write(self, plan: Plan, root: Path, progress: ProgressFn) -> list[WrittenFile]:
        files = _Run(plan, root, progress).write_all()
        write_synced(root / TRACKER, b"1")
        return files
