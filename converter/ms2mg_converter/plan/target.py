"""The Megatron-core GPT target: tensor-parallel split rule, pipeline placement and key names per rank.

This is the one place that knows how Megatron distributes a parameter (Megatron-Bridge style): each
canonical tensor has a split kind, and every model family reuses these rules. Key order per rank file
follows Megatron's `state_dict()` order (local spec), including the `_extra_state` entries Megatron writes.
Reference: target-format.md §4.3 (split rules), §4.4 (placement), §5.3 (names, local vs TE).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ms2mg_converter.config import Normalization, TransformerImpl
from ms2mg_converter.layout import Split
from ms2mg_converter.model.arch import Architecture
from ms2mg_converter.names import EMBED, FC1, FC2, OUTPUT, PROJ, QKV, L

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
    """One entry of a rank file's `model` dict: its key, and the canonical tensor (None: `_extra_state`)."""

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
        yield Slot(f"{prefix}.{EXTRA}")


def _layer_slots(arch: Architecture, impl: TransformerImpl, j: int, layer: int) -> Iterator[Slot]:
    p, t = f"decoder.layers.{j}.", L
    te = impl is TransformerImpl.TRANSFORMER_ENGINE
    if te:
        yield Slot(f"{p}self_attention.core_attention.{EXTRA}")
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


def stage_layers(arch: Architecture, pp: int, stage: int) -> range:
    per = arch.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def rank_slots(arch: Architecture, impl: TransformerImpl, pp: int, stage: int,
               final_norm_extra_state: bool) -> Iterator[Slot]:
    """The `model` entries of one rank file of pipeline stage `stage`, in Megatron's order."""
    first, last = stage == 0, stage == pp - 1
    if first:
        yield Slot("embedding.word_embeddings.weight", "embedding.word_embeddings.weight")
        if arch.position_embedding_type == "learned_absolute":
            yield Slot("embedding.position_embeddings.weight", "embedding.position_embeddings.weight")
    for j, layer in enumerate(stage_layers(arch, pp, stage)):
        yield from _layer_slots(arch, impl, j, layer)
    if not last:
        return
    yield from _norm(arch, "decoder.final_layernorm", "decoder.final_layernorm", None)
    if final_norm_extra_state:
        yield Slot(f"decoder.final_layernorm.{EXTRA}")
    if arch.untie_embeddings_and_output_weights:
        yield Slot("output_layer.weight", "output_layer.weight")
    elif not first:
        # Tied and PP > 1: the last stage holds a copy of its embedding shard (Megatron's saver does this).
        yield Slot("output_layer.weight", "embedding.word_embeddings.weight")
    yield Slot(f"output_layer.{EXTRA}")


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's `get_checkpoint_name` directory for a rank."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
