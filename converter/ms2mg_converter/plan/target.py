"""The Megatron-core GPT target: tensor-parallel split rule, pipeline placement and key names per rank.

This is the one place that knows how Megatron distributes a parameter (Megatron-Bridge style): each
canonical tensor has a split kind, and every model family reuses these rules. Key order per rank file
follows Megatron's `state_dict()` order (local spec), including the `_extra_state` entries Megatron writes.
Reference: target-format.md §4.3 (split rules), §4.4 (placement), §5.3 (names, local vs TE); which layers
each pipeline stage and virtual chunk holds is `pipeline.placements`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from ms2mg_converter.config import Normalization, PipelineLayout, TransformerImpl
from ms2mg_converter.layout import Split
from ms2mg_converter.model.arch import Architecture
from ms2mg_converter.names import (
    EMBED,
    FC1,
    FC2,
    MLA_KV_DOWN,
    MLA_KV_UP,
    MLA_Q,
    MLA_Q_DOWN,
    MLA_Q_UP,
    OUTPUT,
    PROJ,
    QKV,
    SHARED_FC1,
    SHARED_FC2,
    L,
    expert_name,
)
from ms2mg_converter.pipeline import ChunkPlacement, placements
from ms2mg_converter.plan.moe import NO_EXPERTS, ExpertRank, moe_slots

SPLITS: dict[str, Split] = {
    EMBED: Split.VOCAB,
    OUTPUT: Split.VOCAB,
    f"{QKV}.weight": Split.COLUMN,
    f"{QKV}.bias": Split.COLUMN,
    f"{PROJ}.weight": Split.ROW,
    f"{FC1}.weight": Split.GLU,
    f"{FC1}.bias": Split.GLU,
    f"{FC2}.weight": Split.ROW,
    expert_name(0, 1): Split.GLU,
    expert_name(0, 2): Split.ROW,
    f"{SHARED_FC1}.weight": Split.GLU,
    f"{SHARED_FC2}.weight": Split.ROW,
    f"{MLA_Q}.weight": Split.COLUMN,
    f"{MLA_Q_UP}.weight": Split.COLUMN,
    f"{MLA_KV_UP}.weight": Split.COLUMN,
    f"{MLA_Q_DOWN}.weight": Split.COLUMN,
    f"{MLA_KV_DOWN}.weight": Split.COLUMN,
}
"""Split kind per canonical tensor; everything else (norms, row-parallel biases, positions) is replicated."""

TE_REPLICATED = frozenset({f"{MLA_Q_DOWN}.weight", f"{MLA_KV_DOWN}.weight"})
"""MLA down projections: ColumnParallelLinear in the local spec, but TELinear `parallel_mode='duplicated'` in
the TransformerEngine spec (megatron-core >= 0.14 gpt_layer_specs / multi_latent_attention.py)."""

_EXPERT = re.compile(r"(\.local_experts\.)\d+\.")


def split_of(template: str, impl: TransformerImpl = TransformerImpl.LOCAL) -> Split:
    """The split kind of a canonical tensor (routed experts: the rule of expert 0, expert TP = TP; MLA down
    projections: replicated under TransformerEngine)."""
    if impl is TransformerImpl.TRANSFORMER_ENGINE and template in TE_REPLICATED:
        return Split.REPLICATED
    return SPLITS.get(_EXPERT.sub(r"\g<1>0.", template), Split.REPLICATED)


EXTRA = "_extra_state"


@dataclass(frozen=True)
class Slot:
    """One entry of a rank file's `model` dict: its key, the canonical tensor (None: `_extra_state`) and the
    global layer it belongs to (None: embedding, final norm, output layer)."""

    key: str
    template: str | None = None
    layer: int | None = None


def _norm(arch: Architecture, prefix: str, template: str, layer: int | None) -> Iterator[Slot]:
    yield Slot(prefix + ".weight", template + ".weight", layer)
    if arch.normalization is Normalization.LAYERNORM:
        yield Slot(prefix + ".bias", template + ".bias", layer)


def _linear(prefix: str, template: str, layer: int | None, bias: bool, extra: bool = True) -> Iterator[Slot]:
    yield Slot(prefix + ".weight", template + ".weight", layer)
    if bias:
        yield Slot(prefix + ".bias", template + ".bias", layer)
    if extra:
        yield Slot(f"{prefix}.{EXTRA}", None, layer)


def _mla_slots(arch: Architecture, te: bool, j: int, layer: int, norm_extra: bool) -> Iterator[Slot]:
    """An MLA layer's attention, in MLASelfAttention's order (megatron-core 0.16.1 state_dict())."""
    p, t, a = f"decoder.layers.{j}.", L, f"decoder.layers.{j}.self_attention."
    yield from _norm(arch, p + "input_layernorm", t + "input_layernorm", layer)  # TENorm, not fused, under TE
    if te and norm_extra:
        yield Slot(f"{p}input_layernorm.{EXTRA}", None, layer)
    if te:
        yield Slot(f"{a}core_attention.{EXTRA}", None, layer)
    yield from _linear(a + "linear_proj", t + "self_attention.linear_proj", layer, False)
    assert arch.mla is not None
    lora = arch.mla.q_lora_rank is not None
    names = ("linear_q_down_proj", "linear_q_up_proj") if lora else ("linear_q_proj",)
    for name in (*names, "linear_kv_down_proj", "linear_kv_up_proj"):
        norm = {"linear_q_up_proj": "q_layernorm", "linear_kv_up_proj": "kv_layernorm"}.get(name)
        if te and norm and arch.qk_layernorm:  # TELayerNormColumnParallelLinear: the norm fused in
            yield Slot(f"{a}{name}.layer_norm_weight", f"{t}self_attention.{norm}.weight", layer)
        yield from _linear(a + name, f"{t}self_attention.{name}", layer, False)
    if not te:
        yield from _mla_local_norms(arch, j, layer)


def _mla_local_norms(arch: Architecture, j: int, layer: int) -> Iterator[Slot]:
    """The local spec's separate MLA q/kv norms (fused into the up projections under TE)."""
    assert arch.mla is not None
    if arch.qk_layernorm:
        a = f"decoder.layers.{j}.self_attention."
        for norm in ("q_layernorm", "kv_layernorm") if arch.mla.q_lora_rank is not None else ("kv_layernorm",):
            yield Slot(f"{a}{norm}.weight", f"{L}self_attention.{norm}.weight", layer)


def _layer_slots(arch: Architecture, impl: TransformerImpl, j: int, layer: int, ep: ExpertRank,
                 norm_extra: bool = False) -> Iterator[Slot]:
    p, t = f"decoder.layers.{j}.", L
    te = impl is TransformerImpl.TRANSFORMER_ENGINE
    if arch.mla is not None:
        yield from _mla_slots(arch, te, j, layer, norm_extra)
        yield from _mlp_slots(arch, te, j, layer, ep)
        return
    if te:
        yield Slot(f"{p}self_attention.core_attention.{EXTRA}", None, layer)
    else:
        yield from _norm(arch, p + "input_layernorm", t + "input_layernorm", layer)
    yield from _linear(p + "self_attention.linear_proj", t + "self_attention.linear_proj", layer,
                       arch.add_bias_linear)
    if te:
        yield from _te_norm(arch, p + "self_attention.linear_qkv", t + "input_layernorm", layer)
    yield from _linear(p + "self_attention.linear_qkv", t + "self_attention.linear_qkv", layer, arch.add_qkv_bias)
    if arch.qk_layernorm:
        for which in ("q_layernorm", "k_layernorm"):
            yield from _norm(arch, f"{p}self_attention.{which}", f"{t}self_attention.{which}", layer)
    yield from _mlp_slots(arch, te, j, layer, ep)


def _mlp_slots(arch: Architecture, te: bool, j: int, layer: int, ep: ExpertRank) -> Iterator[Slot]:
    p, t = f"decoder.layers.{j}.", L
    moe = arch.moe is not None and arch.moe.is_moe(layer)
    if te and not moe:  # MoE layers keep pre_mlp_layernorm under TE too (TENorm)
        yield from _te_norm(arch, p + "mlp.linear_fc1", t + "pre_mlp_layernorm", layer)
    else:
        yield from _norm(arch, p + "pre_mlp_layernorm", t + "pre_mlp_layernorm", layer)
    if moe:
        yield from moe_slots(arch, j, layer, ep)
        return
    yield from _linear(p + "mlp.linear_fc1", t + "mlp.linear_fc1", layer, arch.add_bias_linear)
    yield from _linear(p + "mlp.linear_fc2", t + "mlp.linear_fc2", layer, arch.add_bias_linear)


def _te_norm(arch: Architecture, prefix: str, template: str, layer: int) -> Iterator[Slot]:
    """TE fuses the preceding norm into the linear: `<linear>.layer_norm_weight` / `layer_norm_bias`."""
    yield Slot(prefix + ".layer_norm_weight", template + ".weight", layer)
    if arch.normalization is Normalization.LAYERNORM:
        yield Slot(prefix + ".layer_norm_bias", template + ".bias", layer)


def rank_chunks(arch: Architecture, pp: int, stage: int, layout: PipelineLayout) -> list[ChunkPlacement]:
    """The model chunks of pipeline stage `stage`: one, or one per virtual stage (`pipeline.placements`)."""
    return placements(arch.num_layers, pp, layout)[stage]


def chunk_slots(arch: Architecture, impl: TransformerImpl, chunk: ChunkPlacement,
                final_norm_extra_state: bool, ep: ExpertRank = NO_EXPERTS) -> Iterator[Slot]:
    """The entries of one chunk's state dict (`model` or `modelN` of a rank file), in Megatron's order."""
    if chunk.pre_process:
        yield Slot("embedding.word_embeddings.weight", "embedding.word_embeddings.weight")
        if arch.position_embedding_type == "learned_absolute":
            yield Slot("embedding.position_embeddings.weight", "embedding.position_embeddings.weight")
    for j, layer in enumerate(chunk.layers):
        yield from _layer_slots(arch, impl, j, layer, ep, final_norm_extra_state)
    if not chunk.post_process:
        return
    yield from _norm(arch, "decoder.final_layernorm", "decoder.final_layernorm", None)
    if final_norm_extra_state:
        yield Slot(f"decoder.final_layernorm.{EXTRA}")
    if arch.untie_embeddings_and_output_weights:
        yield Slot("output_layer.weight", "output_layer.weight")
    elif not chunk.pre_process:
        # Tied, and the embedding is in another chunk: the last chunk holds a copy of its embedding shard
        # (Megatron's saver does this; GPTModel allocates output_layer.weight when post_process and not
        # pre_process).
        yield Slot("output_layer.weight", "embedding.word_embeddings.weight")
    yield Slot(f"output_layer.{EXTRA}")


def dist_slots(arch: Architecture) -> Iterator[Slot]:
    """The entries of a `torch_dist` checkpoint, each at its global layer (`decoder.layers.<l>.`): the TE
    names (Megatron's sharded keys are the same for the local and the TE spec; for MLA layers the local-only
    names are added, `_mla_local_only`) and the superset of
    `_extra_state` entries any loader asks for (torch-dist-format.md §6.2, §6.4); no `output_layer._extra_state`
    (GPTModel drops it) and no tied output copy."""
    yield Slot("embedding.word_embeddings.weight", "embedding.word_embeddings.weight")
    if arch.position_embedding_type == "learned_absolute":
        yield Slot("embedding.position_embeddings.weight", "embedding.position_embeddings.weight")
    for layer in range(arch.num_layers):
        yield from _layer_slots(arch, TransformerImpl.TRANSFORMER_ENGINE, layer, layer, NO_EXPERTS,
                                norm_extra=arch.mla is not None)
        if arch.mla is not None:
            yield from _mla_local_only(arch, layer)
        elif arch.qk_layernorm:
            for which in ("q_layernorm", "k_layernorm"):
                yield Slot(f"decoder.layers.{layer}.self_attention.{which}.{EXTRA}", None, layer)
    yield from _norm(arch, "decoder.final_layernorm", "decoder.final_layernorm", None)
    yield Slot(f"decoder.final_layernorm.{EXTRA}")
    if arch.untie_embeddings_and_output_weights:
        yield Slot("output_layer.weight", "output_layer.weight")


def _mla_local_only(arch: Architecture, layer: int) -> Iterator[Slot]:
    """The sharded keys megatron-core's local MLA spec asks for and its TE spec does not: the local spec has no
    `sharded_state_dict_keys_map` for MLA layers (gpt_layer_specs.py, 0.16.1), so its q/kv norms and a dense
    layer's pre-MLP norm keep their module names. Written beside the TE names (small vectors, the same source
    tensor), one torch_dist checkpoint loads under either spec."""
    yield from _mla_local_norms(arch, layer, layer)
    if arch.moe is None or not arch.moe.is_moe(layer):
        yield from _norm(arch, f"decoder.layers.{layer}.pre_mlp_layernorm", L + "pre_mlp_layernorm", layer)


def rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron's `get_checkpoint_name` directory for a rank (`_EEE` only with expert parallelism)."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"
