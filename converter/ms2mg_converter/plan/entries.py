"""The plan's data: every output file, every tensor in it, and exactly which source rows fill it.

Pure (no torch, no numpy) and built from headers only (`plan.build`). A `TensorEntry` holds the row runs
(`layout.Run`) that produce one rank's shard of one Megatron tensor, already intersected with that rank's
tensor-parallel slice, plus a column range for row-parallel (input-dimension) splits. Executing the plan
reads exactly those rows; `ms2mg inspect` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from ms2mg_converter.config import CkptFormat, ConvertConfig, DType
from ms2mg_converter.layout import Run
from ms2mg_converter.model.arch import Architecture
from ms2mg_converter.source.index import Piece, SourceIndex

ITERATION_DIR = "iter_0000001"
TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"
DTYPE_BYTES = {DType.BF16: 2, DType.FP16: 2, DType.FP32: 4}


@dataclass(frozen=True)
class Read:
    """A source tensor viewed as [rows, cols]."""

    name: str
    file: str
    offset: int
    dtype: str
    rows: int
    cols: int
    pieces: tuple[Piece, ...] = ()
    """A tensor of a distributed source cut over rank files: its slices (`stream.gather`); else empty."""
    transposed: bool = False
    """The stored [rows, cols] block is the transpose of the logical tensor (a grouped expert block)."""


@dataclass(frozen=True)
class TensorEntry:
    key: str
    source: str
    """The canonical Megatron name it comes from (for messages and verification)."""
    shape: tuple[int, ...]
    dtype: DType
    inputs: tuple[Read, ...]
    runs: tuple[Run, ...]
    cols: tuple[int, int] | None = None
    op: str = "copy"
    """Name of the layout operation that builds the TP1 tensor (`LayoutOp.name`)."""
    rebuild_whole: bool = False
    """Verification rebuilds the whole TP1 tensor for it (`LayoutOp.rebuild_whole`)."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class ExtraEntry:
    """An `_extra_state` entry, written as None as Megatron's local layers do."""

    key: str


Entry = TensorEntry | ExtraEntry


@dataclass(frozen=True)
class Group:
    label: str
    entries: tuple[Entry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries if isinstance(e, TensorEntry))


@dataclass(frozen=True)
class Chunk:
    """One state dict of a rank file: `model`, or `model0`, `model1`, ... with virtual pipeline chunks."""

    key: str
    layers: range
    """The global layer numbers it holds (numbered from 0 inside the chunk)."""
    groups: tuple[Group, ...]

    def entries(self) -> Iterator[Entry]:
        for g in self.groups:
            yield from g.entries


@dataclass(frozen=True)
class FilePlan:
    path: str
    tp_rank: int
    pp_rank: int
    chunks: tuple[Chunk, ...]
    ep_rank: int = 0

    @property
    def groups(self) -> tuple[Group, ...]:
        """Every chunk's groups, in file order."""
        return tuple(g for c in self.chunks for g in c.groups)

    @property
    def tensor_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    def entries(self) -> Iterator[Entry]:
        for c in self.chunks:
            yield from c.entries()

    def chunk_entries(self) -> Iterator[tuple[str, Entry]]:
        """(state dict key, entry) for every entry, in file order."""
        for c in self.chunks:
            for e in c.entries():
                yield c.key, e


@dataclass(frozen=True)
class Plan:
    config: ConvertConfig
    arch: Architecture
    args: dict[str, object]
    files: tuple[FilePlan, ...]
    dropped: tuple[str, ...]
    ignored: tuple[str, ...]
    source: SourceIndex = field(repr=False)

    @property
    def shard_tp(self) -> int:
        """The tensor-parallel size the entries are split for: 1 for torch_dist (global tensors)."""
        return 1 if self.config.ckpt_format is CkptFormat.TORCH_DIST else self.config.tensor_parallel

    @property
    def total_groups(self) -> int:
        return sum(len(f.groups) for f in self.files)

    @property
    def tensor_bytes(self) -> int:
        return sum(f.tensor_bytes for f in self.files)
