"""Mapping tables: how each MindFormers naming family becomes Megatron-core tensors. Data, not code.

A table is a list of `Recipe`s. Each recipe names one Megatron tensor (the TP1/PP1 "canonical" name, a
template with `{layer}`), the named operation that builds it (`ops.py`), and the source tensor(s) it is
built from. Where a target can be built several ways (fused or separate q/k/v, SwiGLU or not), the table
lists each way; per layer the recipe whose sources are all present, and that uses the most of them, wins.

Keys matched by `DROPPED` are optimizer state or bookkeeping: dropped and listed in the report. Any other
key that no recipe uses is an error (unless the user passes `--ignore-keys`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import StrEnum


class OpKind(StrEnum):
    COPY = "copy"
    QKV_FUSED = "qkv_fused"
    """One fused q/k/v tensor in the source's QKV layout -> Megatron's grouped layout."""
    QKV_SPLIT = "qkv_split"
    """Separate q, k, v tensors -> Megatron's grouped layout."""
    GLU_FUSED = "glu_fused"
    """One fused SwiGLU fc1 tensor in the source's fc1 layout -> Megatron's [gate; up]."""
    GLU_SPLIT = "glu_split"
    """Separate gate and up tensors -> Megatron's [gate; up]."""


@dataclass(frozen=True)
class Recipe:
    target: str
    op: OpKind
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    recipes: tuple[Recipe, ...]
    fused_qkv_default: str | None = None
    """QKV layout of this family's fused tensor when the user gives none (None: the user must say)."""
    fused_fc1_default: str | None = None


L = "decoder.layers.{layer}."


def _same(*targets: str, op: OpKind = OpKind.COPY) -> tuple[Recipe, ...]:
    return tuple(Recipe(t, op, (t,)) for t in targets)


_NORMS = ("input_layernorm", "pre_mlp_layernorm", "self_attention.q_layernorm", "self_attention.k_layernorm")

MCORE = Family(
    name="mcore",
    description="MindFormers mcore (mindformers.parallel_core) names: identical to Megatron-core names",
    recipes=(
        *_same("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
               "decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight"),
        *_same(*(f"{L}{n}.{p}" for n in _NORMS for p in ("weight", "bias"))),
        *_same(f"{L}self_attention.linear_proj.weight", f"{L}self_attention.linear_proj.bias",
               f"{L}mlp.linear_fc2.weight", f"{L}mlp.linear_fc2.bias"),
        *_same(f"{L}self_attention.linear_qkv.weight", f"{L}self_attention.linear_qkv.bias",
               op=OpKind.QKV_FUSED),
        *_same(f"{L}mlp.linear_fc1.weight", f"{L}mlp.linear_fc1.bias", op=OpKind.GLU_FUSED),
    ),
)

_LL = "model.layers.{layer}."


def _legacy_qkv(p: str) -> tuple[Recipe, ...]:
    target = f"{L}self_attention.linear_qkv.{p}"
    return (
        Recipe(target, OpKind.QKV_SPLIT, tuple(f"{_LL}attention.w{x}.{p}" for x in "qkv")),
        Recipe(target, OpKind.QKV_FUSED, (f"{_LL}attention.w_qkv.{p}",)),
    )


def _legacy_fc1(p: str) -> tuple[Recipe, ...]:
    target = f"{L}mlp.linear_fc1.{p}"
    return (
        Recipe(target, OpKind.GLU_SPLIT, (f"{_LL}feed_forward.w1.{p}", f"{_LL}feed_forward.w3.{p}")),
        Recipe(target, OpKind.COPY, (f"{_LL}feed_forward.w1.{p}",)),
        Recipe(target, OpKind.GLU_FUSED, (f"{_LL}feed_forward.w_gate_hidden.{p}",)),
    )


LEGACY = Family(
    name="legacy",
    description="MindFormers llama-style (pre-mcore) names: model.tok_embeddings, attention.wq/wk/wv/wo, "
                "feed_forward.w1/w2/w3 (w1 gate, w3 up, w2 down), attention_norm, ffn_norm, norm_out, lm_head",
    recipes=(
        Recipe("embedding.word_embeddings.weight", OpKind.COPY, ("model.tok_embeddings.embedding_weight",)),
        Recipe("output_layer.weight", OpKind.COPY, ("lm_head.weight",)),
        *(Recipe(f"decoder.final_layernorm.{p}", OpKind.COPY, (f"model.norm_out.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{L}input_layernorm.{p}", OpKind.COPY, (f"{_LL}attention_norm.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{L}pre_mlp_layernorm.{p}", OpKind.COPY, (f"{_LL}ffn_norm.{p}",)) for p in ("weight", "bias")),
        *_legacy_qkv("weight"), *_legacy_qkv("bias"),
        Recipe(f"{L}self_attention.linear_proj.weight", OpKind.COPY, (f"{_LL}attention.wo.weight",)),
        Recipe(f"{L}self_attention.linear_proj.bias", OpKind.COPY, (f"{_LL}attention.wo.bias",)),
        *_legacy_fc1("weight"), *_legacy_fc1("bias"),
        Recipe(f"{L}mlp.linear_fc2.weight", OpKind.COPY, (f"{_LL}feed_forward.w2.weight",)),
        Recipe(f"{L}mlp.linear_fc2.bias", OpKind.COPY, (f"{_LL}feed_forward.w2.bias",)),
    ),
    fused_qkv_default="contiguous",
    fused_fc1_default="gate-up",
)

FAMILIES: tuple[Family, ...] = (MCORE, LEGACY)

DROPPED: tuple[str, ...] = (
    "adam_m.*", "adam_v.*", "accu_grads.*", "moments.*", "*.moments.*",
    "global_step", "epoch_num", "step_num", "loss_scale", "scale_sense", "current_iterator_step",
    "last_overflow_iterator_step", "learning_rate", "beta1_power", "beta2_power",
    "*dropout*", "*.inv_freq", "*max_logits_val*",
)
"""Optimizer state and training bookkeeping found in MindFormers checkpoints: never model weights."""


def is_dropped(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in DROPPED)


def template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{layer}"), r"(?P<layer>0|[1-9][0-9]*)") + "$")


@dataclass(frozen=True)
class SourceMatch:
    template: str
    layer: int | None


class SourceMatcher:
    """Finds which source template (and layer) a key belongs to, for one family."""

    def __init__(self, family: Family) -> None:
        templates = sorted({s for r in family.recipes for s in r.sources})
        self._exact = {t for t in templates if "{layer}" not in t}
        self._patterns = [(t, template_regex(t)) for t in templates if "{layer}" in t]

    def match(self, key: str) -> SourceMatch | None:
        if key in self._exact:
            return SourceMatch(key, None)
        for template, pattern in self._patterns:
            m = pattern.match(key)
            if m:
                return SourceMatch(template, int(m.group("layer")))
        return None


def fill(template: str, layer: int | None) -> str:
    return template if layer is None else template.replace("{layer}", str(layer))
