"""The conversion plan: every output file, every tensor in it, and exactly which source rows fill it.

Pure (no torch, no numpy) and built from headers only. A `TensorEntry` holds the row runs (`ops.Run`) that
produce one rank's shard of one Megatron tensor, already intersected with that rank's tensor-parallel
slice, plus a column range for row-parallel (input-dimension) splits. Executing the plan reads exactly
those rows; `ms2mg inspect` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from ms2mg_converter import ops
from ms2mg_converter.arch import Architecture, infer_architecture
from ms2mg_converter.checks import parallelism_problems
from ms2mg_converter.config import ConvertConfig, DType, Fc1Layout, ModelOverrides, QkvLayout
from ms2mg_converter.errors import MissingKeyError, ParallelismError
from ms2mg_converter.megatron_args import megatron_args
from ms2mg_converter.resolve import Logical, SourceView, resolve
from ms2mg_converter.source import SourceIndex, open_source
from ms2mg_converter.tables import OpKind, fill
from ms2mg_converter.target import Slot, Split, rank_dir, rank_slots, split_of

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


@dataclass(frozen=True)
class TensorEntry:
    key: str
    source: str
    """The canonical Megatron name it comes from (for messages and verification)."""
    shape: tuple[int, ...]
    dtype: DType
    inputs: tuple[Read, ...]
    runs: tuple[ops.Run, ...]
    cols: tuple[int, int] | None = None

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
class FilePlan:
    path: str
    tp_rank: int
    pp_rank: int
    groups: tuple[Group, ...]

    @property
    def tensor_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    def entries(self) -> Iterator[Entry]:
        for g in self.groups:
            yield from g.entries


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
    def total_groups(self) -> int:
        return sum(len(f.groups) for f in self.files)

    @property
    def tensor_bytes(self) -> int:
        return sum(f.tensor_bytes for f in self.files)


def _full_runs(logical: Logical, arch: Architecture, rows: int, vocab: bool, cfg: ConvertConfig) -> list[ops.Run]:
    op = logical.recipe.op
    nh, ng, d, f = arch.num_attention_heads, arch.num_query_groups, arch.kv_channels, arch.ffn_hidden_size
    if op is OpKind.QKV_FUSED:
        return ops.qkv_fused(nh, ng, d, arch.qkv_layout or QkvLayout.GROUPED)
    if op is OpKind.QKV_SPLIT:
        return ops.qkv_split(nh, ng, d)
    if op is OpKind.GLU_FUSED and arch.swiglu:
        return ops.glu_fused(f, arch.fc1_layout or Fc1Layout.GATE_UP)
    if op is OpKind.GLU_SPLIT:
        return ops.glu_split(f)
    if vocab:
        true = arch.true_vocab_size or rows
        return ops.vocab(rows, true, arch.padded_vocab_size, cfg.vocab.pad_fill)
    return ops.identity(rows)


def _tp_slice(runs: list[ops.Run], split: Split, arch: Architecture, tp: int, r: int,
              total: int) -> tuple[list[ops.Run], int]:
    if split is Split.GLU and arch.swiglu:
        per = arch.ffn_hidden_size // tp
        gate = ops.select(runs, r * per, (r + 1) * per)
        up = ops.select(runs, arch.ffn_hidden_size + r * per, arch.ffn_hidden_size + (r + 1) * per)
        return gate + [ops.Run(x.dst + per, x.count, x.src, x.start, x.step) for x in up], 2 * per
    if split in (Split.VOCAB, Split.COLUMN, Split.GLU):
        per = total // tp
        return ops.select(runs, r * per, (r + 1) * per), per
    return runs, total


def _entry(slot: Slot, logical: Logical, plan_ctx: tuple[Architecture, ConvertConfig, int]) -> TensorEntry:
    arch, cfg, r = plan_ctx
    assert slot.template is not None
    split = split_of(slot.template)
    first = logical.inputs[0]
    rest = first.shape[1:]
    cols = math.prod(rest)
    src_rows = [i.shape[0] for i in logical.inputs]
    full = _full_runs(logical, arch, src_rows[0], split is Split.VOCAB, cfg)
    total = ops.covered(full)
    runs, rows = _tp_slice(full, split, arch, cfg.tensor_parallel, r, total)
    col_range = None
    shape = (rows, *rest)
    if split is Split.ROW:
        per = rest[0] // cfg.tensor_parallel
        col_range, shape = (r * per, (r + 1) * per), (rows, per)
    inputs = tuple(Read(i.name, str(i.file), i.offset, i.dtype, i.shape[0], cols) for i in logical.inputs)
    return TensorEntry(slot.key, logical.name, shape, cfg.dtype, inputs, tuple(runs), col_range)


def _group_label(slot: Slot) -> str:
    if slot.key.startswith("decoder.layers."):
        return "layer " + slot.key.split(".")[2]
    return "embedding" if slot.key.startswith("embedding.") else "final"


def _file_plan(view: SourceView, arch: Architecture, cfg: ConvertConfig, t: int, p: int) -> FilePlan:
    groups: list[Group] = []
    current: list[Entry] = []
    label = ""
    for slot in rank_slots(arch, cfg.transformer_impl, cfg.pipeline_parallel, p, cfg.final_norm_extra_state):
        here = _group_label(slot)
        if current and here != label:
            groups.append(Group(label, tuple(current)))
            current = []
        label = here
        if slot.template is None:
            current.append(ExtraEntry(slot.key))
            continue
        logical = view.get(slot.template, slot.layer)
        if logical is None:
            raise MissingKeyError(f"the source has no {fill(slot.template, slot.layer)}, which rank file "
                                  f"{rank_dir(t, p, cfg.pipeline_parallel)} needs for {slot.key}.")
        current.append(_entry(slot, logical, (arch, cfg, t)))
    if current:
        groups.append(Group(label, tuple(current)))
    path = f"{ITERATION_DIR}/{rank_dir(t, p, cfg.pipeline_parallel)}/{CHECKPOINT_FILE}"
    return FilePlan(path, t, p, tuple(groups))


def check_parallelism(arch: Architecture, cfg: ConvertConfig) -> None:
    values = ModelOverrides(num_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
                            num_query_groups=arch.num_query_groups, ffn_hidden_size=arch.ffn_hidden_size)
    problems = parallelism_problems(values, cfg.tensor_parallel, cfg.pipeline_parallel)
    if arch.padded_vocab_size % cfg.tensor_parallel:
        problems.append(f"the padded vocabulary ({arch.padded_vocab_size}) is not divisible by tensor "
                        f"parallel size ({cfg.tensor_parallel})")
    if problems:
        raise ParallelismError(f"cannot split this model TP={cfg.tensor_parallel} x PP="
                               f"{cfg.pipeline_parallel}: " + "; ".join(problems) + ". Choose sizes that "
                               "divide these numbers.")


def build_plan(cfg: ConvertConfig, source: SourceIndex | None = None) -> Plan:
    """Read headers, infer and check the architecture, and lay out every output file."""
    index = source or open_source(cfg.load_dir, cfg.load_root)
    view = resolve(index, cfg.ignore_keys)
    arch = infer_architecture(view, cfg)
    check_parallelism(arch, cfg)
    files = tuple(_file_plan(view, arch, cfg, t, p)
                  for p in range(cfg.pipeline_parallel) for t in range(cfg.tensor_parallel))
    return Plan(cfg, arch, megatron_args(arch, cfg), files, view.dropped, view.ignored, index)
