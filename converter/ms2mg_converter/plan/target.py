"""The Megatron-core GPT target: tensor-parallel split rule, pipeline placement and key names per rank.

This is the one place that knows how Megatron distributes a parameter (Megatron-Bridge style): each
canonical tensor has a split kind, and every model family reuses these rules. Key order per rank file
follows Megatron's `state_dict()` order (local spec), including the `_extra_state` entries Megatron writes.
Reference: target-format.md §4.3 (split rules), §4.4 (placement), §5.3 (names, local vs TE); which layers
each pipeline stage and virtual chunk holds is `pipeline.placements`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ms2mg_converter.config import Normalization, PipelineLayout, TransformerImpl
from ms2mg_converter.layout import Split
from ms2mg_converter.model.arch import Architecture
from ms2mg_converter.names import EMBED, FC1, FC2, OUTPUT, PROJ, QKV, L
from ms2mg_converter.pipeline import ChunkPlacement, placements

SPLITS: dict[str, Split] = {
    EMBED: Split.VOCAB,
    OUTPUT: Split.VOCAB,
    f"{QKV}.weight": Split.COLUMN,
    f"{QKV}.bias": Split.COLUMN,
    f"{PROJ}.weight": Split.ROW,
    f"{FC1}.weight": Split.GLU,
    f"{FC1}.bias": Split.GLU,
    f"{FC2}.weight": Split.ROW,
}
"""Split kind per canonical tensor; everything else (norms, row-parallel biases, positions) is replicated."""


def split_of(template: str) -> Split:
    return SPLITS.get(template, Split.REPLICATED)


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


def _layer_slots(arch: Architecture, impl: TransformerImpl, j: int, layer: int) -> Iterator[Slot]:
    p, t = f"decoder.layers.{j}.", L
    te = impl is TransformerImpl.TRANSFORMER_ENGINE
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
    if te:
        yield from _te_norm(arch, p + "mlp.linear_fc1", t + "pre_mlp_layernorm", layer)
    else:
        yield from _norm(arch, p + "pre_mlp_layernorm", t + "pre_mlp_layernorm", layer)
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
                final_norm_extra_state: bool) -> Iterator[Slot]:
    """The entries of one chunk's state dict (`model` or `modelN` of a rank file), in Megatron's order."""
    if chunk.pre_process:
        yield Slot("embedding.word_embeddings.weight", "embedding.word_embeddings.weight")
        if arch.position_embedding_type == "learned_absolute":
            yield Slot("embedding.position_embeddings.weight", "embedding.position_embeddings.weight")
    for j, layer in enumerate(chunk.layers):
        yield from _layer_slots(arch, impl, j, layer)
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
    names (Megatron's sharded keys are the same for the local and the TE spec) and the superset of
    `_extra_state` entries any loader asks for (torch-dist-format.md §6.2, §6.4); no `output_layer._extra_state`
    (GPTModel drops it) and no tied output copy."""
    yield Slot("embedding.word_embeddings.weight", "embedding.word_embeddings.weight")
    if arch.position_embedding_type == "learned_absolute":
        yield Slot("embedding.position_embeddings.weight", "embedding.position_embeddings.weight")
    for layer in range(arch.num_layers):
        yield from _layer_slots(arch, TransformerImpl.TRANSFORMER_ENGINE, layer, layer)
        if arch.qk_layernorm:
            for which in ("q_layernorm", "k_layernorm"):
                yield Slot(f"decoder.layers.{layer}.self_attention.{which}.{EXTRA}", None, layer)
    yield from _norm(arch, "decoder.final_layernorm", "decoder.final_layernorm", None)
    yield Slot(f"decoder.final_layernorm.{EXTRA}")
    if arch.untie_embeddings_and_output_weights:
        yield Slot("output_layer.weight", "output_layer.weight")


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's `get_checkpoint_name` directory for a rank."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
