"""Building the plan: headers -> source view -> architecture -> every rank file's entries (pure, no torch)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ms2mg_converter.checks import parallelism_problems
from ms2mg_converter.config import CkptFormat, ConvertConfig, ModelOverrides, TransformerImpl
from ms2mg_converter.errors import MissingKeyError, ParallelismError, UsageError
from ms2mg_converter.layout import LayoutOp, Run, Split, VocabResize, concat, covered, select
from ms2mg_converter.model.arch import Architecture, infer_architecture
from ms2mg_converter.model.megatron_args import megatron_args
from ms2mg_converter.model.mla import mla_parallel_problems
from ms2mg_converter.names import fill
from ms2mg_converter.pipeline import ChunkPlacement
from ms2mg_converter.plan.dist import DIST_FILE
from ms2mg_converter.plan.entries import (
    CHECKPOINT_FILE,
    ITERATION_DIR,
    Chunk,
    Entry,
    ExtraEntry,
    FilePlan,
    Group,
    Plan,
    Read,
    TensorEntry,
)
from ms2mg_converter.plan.moe import ExpertRank, expert_problems
from ms2mg_converter.plan.target import Slot, chunk_slots, dist_slots, rank_chunks, rank_dir, split_of
from ms2mg_converter.source.index import SourceIndex, TensorInfo, open_source
from ms2mg_converter.source.resolve import Logical, SourceView, resolve


def layout_op(logical: Logical, arch: Architecture, cfg: ConvertConfig) -> LayoutOp:
    """The operation that builds this Megatron tensor, bound to the model (vocabulary tables: resized)."""
    shapes = [i.shape for i in logical.inputs]
    op = logical.recipe.op.bind(arch, shapes)
    if split_of(logical.target, cfg.transformer_impl) is Split.VOCAB and op.rebuild_whole is False:
        rows = shapes[0][0]
        return VocabResize(rows, arch.true_vocab_size or rows, arch.padded_vocab_size, cfg.vocab.pad_fill)
    return op


def _rank_runs(runs: list[Run], split: Split, arch: Architecture, tp: int, r: int) -> tuple[list[Run], int]:
    ranges = split.row_ranges(covered(runs), tp, r, arch.swiglu)
    return concat(*(select(runs, a, b) for a, b in ranges)), sum(b - a for a, b in ranges)


def _entry(slot: Slot, logical: Logical, plan_ctx: tuple[Architecture, ConvertConfig, int]) -> TensorEntry:
    arch, cfg, r = plan_ctx
    assert slot.template is not None
    split = split_of(slot.template, cfg.transformer_impl)
    rest = logical.inputs[0].shape[1:] if logical.inputs else ()  # no inputs: a synthesized vector
    op = layout_op(logical, arch, cfg)
    runs, rows = _rank_runs(op.runs(), split, arch, cfg.tensor_parallel, r)
    col_range = split.col_range(rest[0], cfg.tensor_parallel, r) if rest else None
    shape = (rows, *rest) if col_range is None else (rows, col_range[1] - col_range[0])
    inputs = tuple(_read(i) for i in logical.inputs)
    return TensorEntry(slot.key, logical.name, shape, cfg.dtype, inputs, tuple(runs), col_range, op.name,
                       op.rebuild_whole)


def _read(i: TensorInfo) -> Read:
    if i.block is not None:  # a grouped expert block, stored transposed (source.experts)
        return Read(i.name, str(i.file), i.offset, i.dtype, i.shape[1], i.shape[0], transposed=True)
    return Read(i.name, str(i.file), i.offset, i.dtype, i.shape[0], math.prod(i.shape[1:]), pieces=i.pieces)


def _group_label(slot: Slot) -> str:
    if slot.layer is not None:
        return f"layer {slot.layer}"
    return "embedding" if slot.key.startswith("embedding.") else "final"


def _chunk(view: SourceView, arch: Architecture, cfg: ConvertConfig, t: int, p: int,
           placement: ChunkPlacement, ep: ExpertRank) -> Chunk:
    """One state dict of rank file (t, p), grouped by layer (the unit of progress)."""
    slots = chunk_slots(arch, cfg.transformer_impl, placement, cfg.final_norm_extra_state, ep)
    where = f"rank file {rank_dir(t, p, cfg.pipeline_parallel, ep.rank, ep.size)}"
    return _grouped(view, (arch, cfg, t), where, placement, slots)


def _grouped(view: SourceView, ctx: tuple[Architecture, ConvertConfig, int], where: str,
             placement: ChunkPlacement, slots: Iterable[Slot]) -> Chunk:
    groups: list[Group] = []
    current: list[Entry] = []
    label = ""
    for slot in slots:
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
            raise MissingKeyError(f"the source has no {fill(slot.template, slot.layer)}, which "
                                  f"{where} needs for {slot.key}.")
        current.append(_entry(slot, logical, ctx))
    if current:
        groups.append(Group(label, tuple(current)))
    return Chunk(placement.key, placement.layers, tuple(groups))


def _file_plan(view: SourceView, arch: Architecture, cfg: ConvertConfig, t: int, p: int, e: int) -> FilePlan:
    ep = ExpertRank(e, cfg.moe.expert_parallel, cfg.moe.grouped_gemm)
    chunks = tuple(_chunk(view, arch, cfg, t, p, c, ep)
                   for c in rank_chunks(arch, cfg.pipeline_parallel, p, cfg.pipeline_layout))
    path = f"{ITERATION_DIR}/{rank_dir(t, p, cfg.pipeline_parallel, e, ep.size)}/{CHECKPOINT_FILE}"
    return FilePlan(path, t, p, chunks, e)


def _dist_file_plan(view: SourceView, arch: Architecture, cfg: ConvertConfig) -> FilePlan:
    """torch_dist: one data file of global tensors (TP 1, every layer at its global number), whatever the
    TP/PP the checkpoint is meant for (Megatron reshards it on load; `args` records the sizes)."""
    whole = ChunkPlacement("model", range(arch.num_layers), pre_process=True, post_process=True)
    global_cfg = cfg.model_copy(update={"tensor_parallel": 1})
    chunk = _grouped(view, (arch, global_cfg, 0), "the torch_dist checkpoint", whole, dist_slots(arch))
    return FilePlan(f"{ITERATION_DIR}/{DIST_FILE}", 0, 0, (chunk,))


def _check_dist_supported(arch: Architecture) -> None:
    """torch_dist's sharded keys are written for dense and MLA attention; MoE experts (sharded by expert) have
    their own sharded-key layout, which ms2mg does not write yet: refuse rather than guess."""
    if arch.moe is not None:
        raise UsageError("--ckpt-format torch_dist does not support MoE layers yet; convert this model "
                         "with --ckpt-format torch (Megatron-LM can re-save it as torch_dist: "
                         "--ckpt-convert-format torch_dist --ckpt-convert-save DIR).")


def check_parallelism(arch: Architecture, cfg: ConvertConfig) -> None:
    values = ModelOverrides(num_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
                            num_query_groups=arch.num_query_groups, ffn_hidden_size=arch.ffn_hidden_size)
    problems = parallelism_problems(values, cfg.tensor_parallel, cfg.pipeline_parallel,
                                    cfg.pipeline_layout)
    problems += expert_problems(arch, cfg.tensor_parallel, cfg.moe.expert_parallel, cfg.moe.expert_tensor_parallel)
    if arch.mla is not None:
        problems += mla_parallel_problems(arch.mla, cfg.tensor_parallel,
                                          cfg.transformer_impl is not TransformerImpl.TRANSFORMER_ENGINE)
    if arch.padded_vocab_size % cfg.tensor_parallel:
        problems.append(f"the padded vocabulary ({arch.padded_vocab_size}) is not divisible by tensor "
                        f"parallel size ({cfg.tensor_parallel})")
    if problems:
        raise ParallelismError(f"cannot split this model TP={cfg.tensor_parallel} x PP="
                               f"{cfg.pipeline_parallel} x EP={cfg.moe.expert_parallel}: " + "; ".join(problems)
                               + ". Choose sizes that "
                               "divide these numbers.")


def build_plan(cfg: ConvertConfig, source: SourceIndex | None = None) -> Plan:
    """Read headers, infer and check the architecture, and lay out every output file."""
    index = source or open_source(cfg.load_dir, cfg.load_root, cfg.src_strategy, cfg.src_ckpt_suffix)
    view = resolve(index, cfg.ignore_keys)
    arch = infer_architecture(view, cfg)
    check_parallelism(arch, cfg)
    if cfg.ckpt_format is CkptFormat.TORCH_DIST:
        _check_dist_supported(arch)
        files: tuple[FilePlan, ...] = (_dist_file_plan(view, arch, cfg),)
    else:
        files = tuple(_file_plan(view, arch, cfg, t, p, e) for p in range(cfg.pipeline_parallel)
                      for e in range(cfg.moe.expert_parallel) for t in range(cfg.tensor_parallel))
    return Plan(cfg, arch, megatron_args(arch, cfg), files, view.dropped, view.ignored, index)
