"""MindFormers llama-style (pre-mcore) names: model.tok_embeddings, attention.wq/wk/wv/wo, feed_forward.w1/w2/w3
(w1 gate, w3 up, w2 down), attention_norm, ffn_norm, norm_out, lm_head; fused attention.w_qkv and
feed_forward.w_gate_hidden."""

from __future__ import annotations

from ms2mg_converter.layout import Copy, GluFused, GluSplit, QkvFused, QkvSplit
from ms2mg_converter.names import EMBED, FC1, FC2, FINAL, INPUT_NORM, MLP_NORM, OUTPUT, PROJ, QKV
from ms2mg_converter.source.families.base import Family, Recipe
from ms2mg_converter.source.families.registry import register

_LL = "model.layers.{layer}."


def _qkv(p: str) -> tuple[Recipe, ...]:
    return (
        Recipe(f"{QKV}.{p}", QkvSplit, tuple(f"{_LL}attention.w{x}.{p}" for x in "qkv")),
        Recipe(f"{QKV}.{p}", QkvFused, (f"{_LL}attention.w_qkv.{p}",)),
    )


def _fc1(p: str) -> tuple[Recipe, ...]:
    return (
        Recipe(f"{FC1}.{p}", GluSplit, (f"{_LL}feed_forward.w1.{p}", f"{_LL}feed_forward.w3.{p}")),
        Recipe(f"{FC1}.{p}", Copy, (f"{_LL}feed_forward.w1.{p}",)),
        Recipe(f"{FC1}.{p}", GluFused, (f"{_LL}feed_forward.w_gate_hidden.{p}",)),
    )


LEGACY = register(Family(
    name="legacy",
    description="MindFormers llama-style (pre-mcore) names: model.tok_embeddings, attention.wq/wk/wv/wo, "
                "feed_forward.w1/w2/w3 (w1 gate, w3 up, w2 down), attention_norm, ffn_norm, norm_out, lm_head",
    recipes=(
        Recipe(EMBED, Copy, ("model.tok_embeddings.embedding_weight",)),
        Recipe(OUTPUT, Copy, ("lm_head.weight",)),
        *(Recipe(f"{FINAL}.{p}", Copy, (f"model.norm_out.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{INPUT_NORM}.{p}", Copy, (f"{_LL}attention_norm.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{MLP_NORM}.{p}", Copy, (f"{_LL}ffn_norm.{p}",)) for p in ("weight", "bias")),
        *_qkv("weight"), *_qkv("bias"),
        Recipe(f"{PROJ}.weight", Copy, (f"{_LL}attention.wo.weight",)),
        Recipe(f"{PROJ}.bias", Copy, (f"{_LL}attention.wo.bias",)),
        *_fc1("weight"), *_fc1("bias"),
        Recipe(f"{FC2}.weight", Copy, (f"{_LL}feed_forward.w2.weight",)),
        Recipe(f"{FC2}.bias", Copy, (f"{_LL}feed_forward.w2.bias",)),
    ),
    fused_qkv_default="contiguous",
    fused_fc1_default="gate-up",
))
