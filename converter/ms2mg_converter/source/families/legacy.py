"""MindFormers llama-style (pre-mcore) names, used by models/llama and research models built on it (Llama 2/3,
Qwen2/2.5 in research/qwen2_5, ...): model.tok_embeddings, attention.wq/wk/wv/wo, feed_forward.w1/w2/w3 (w1 gate,
w3 up, w2 down), attention_norm, ffn_norm, norm_out, lm_head; with `qkv_concat: True` the fused
attention.w_qkv and feed_forward.w_gate_hidden.

The fused row order changed between versions and a YAML's `qkv_concat: True` does not tell which, so it is
never assumed (`layout_help` tells the user what to pass):
* r1.3: models/llama/llama_transformer.py splits w_qkv with SplitWithSize (hidden, kv_dim, kv_dim) and
  llama_layer.py splits w_gate_hidden (hidden_dim, hidden_dim), both with skip_redistribution, i.e. on each
  training rank's slice: [Q_r;K_r;V_r] and [G_r;U_r] per source TP rank;
* r1.4.0-beta2 .. master: utils/convert_utils.py qkv_concat_hf2mg packs w_qkv per query group (Megatron's
  grouped order) and ffn_concat_hf2mg interleaves gate/up one row at a time.
RoPE: mindformers/modules/layers.py RotaryEmbedding rotates halves of the whole head dim (`slice_half`:
concat(-x2, x1)), Megatron's rotary_interleaved=False, rotary_percent 1.0.
"""

from __future__ import annotations

from ms2mg_converter.layout import Copy, GluFused, GluSplit, QkvFused, QkvSplit
from ms2mg_converter.names import EMBED, FC1, FC2, FINAL, INPUT_NORM, MLP_NORM, OUTPUT, PROJ, QKV
from ms2mg_converter.source.families.base import Family, Recipe
from ms2mg_converter.source.families.registry import register

_LL = "model.layers.{layer}."

LAYOUT_HELP = {
    "qkv": "--qkv-layout contiguous for a MindFormers r1.3 checkpoint (w_qkv = [Q;K;V] per training TP rank; "
           "also give --source-tensor-parallel-size) or --qkv-layout grouped for r1.4.0-beta2 and later "
           "(w_qkv per query group, convert_utils.qkv_concat_hf2mg)",
    "fc1": "--fc1-layout gate-up for a MindFormers r1.3 checkpoint (w_gate_hidden = [gate; up] per training TP "
           "rank) or --fc1-layout interleaved for r1.4.0-beta2 and later (rows gate, up, gate, up; "
           "convert_utils.ffn_concat_hf2mg)",
}


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


def common(ll: str) -> tuple[Recipe, ...]:
    """Embedding, norms, output layer, attention output and fc2: shared by the llama-style families."""
    return (
        Recipe(EMBED, Copy, ("model.tok_embeddings.embedding_weight",)),
        Recipe(OUTPUT, Copy, ("lm_head.weight",)),
        *(Recipe(f"{FINAL}.{p}", Copy, (f"model.norm_out.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{INPUT_NORM}.{p}", Copy, (f"{ll}attention_norm.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{MLP_NORM}.{p}", Copy, (f"{ll}ffn_norm.{p}",)) for p in ("weight", "bias")),
        Recipe(f"{PROJ}.weight", Copy, (f"{ll}attention.wo.weight",)),
        Recipe(f"{FC2}.weight", Copy, (f"{ll}feed_forward.w2.weight",)),
    )


LLAMA_ROPE: dict[str, float | bool] = {"rotary_percent": 1.0, "rotary_interleaved": False}

LEGACY = register(Family(
    name="legacy",
    description="MindFormers llama-style (pre-mcore) names: model.tok_embeddings, attention.wq/wk/wv/wo or "
                "w_qkv, feed_forward.w1/w2/w3 or w_gate_hidden, attention_norm, ffn_norm, norm_out, lm_head",
    recipes=(
        *common(_LL),
        *_qkv("weight"), *_qkv("bias"),
        Recipe(f"{PROJ}.bias", Copy, (f"{_LL}attention.wo.bias",)),
        *_fc1("weight"), *_fc1("bias"),
        Recipe(f"{FC2}.bias", Copy, (f"{_LL}feed_forward.w2.bias",)),
    ),
    facts=LLAMA_ROPE,
    layout_help=LAYOUT_HELP,
))
