"""TeleChat2 in MindFormers' research/telechat2 naming (telechat_transformer.py, telechat_layer.py,
convert_weight.py; read at mindspore-lab/mindformers 0afe877 / dd6ef84).

Names: the llama-style embedding, norms, output layer, attention.wo and feed_forward.w1/w2/w3, but q and kv
as attention.wq and attention.wk_v: wk_v holds per KV head [k_h; v_h] (reshaped to (n_kv_head, 2 * head_dim)
and split in halves), which does not depend on the training TP size. Biases (TelechatAttention
qkv_has_bias False, wo_has_bias True; TelechatFeedForward w2 has_bias True): on wo and w2 only. Megatron has
biases on all linear layers or none (add_bias_linear), so the q/k/v and fc1 biases are written as zeros,
which computes exactly what no bias computes. RoPE: mindformers.modules.layers.RotaryEmbedding, as llama
(whole head dim, halves rotated): rotary_percent 1.0, rotary_interleaved False.
"""

from __future__ import annotations

from ms2mg_converter.layout import Copy, Fc1BiasZeros, GluSplit, HiddenBiasZeros, QkvBiasZeros, QkvFromQAndKv
from ms2mg_converter.names import FC1, FC2, PROJ, QKV
from ms2mg_converter.source.families.base import Family, Recipe
from ms2mg_converter.source.families.legacy import LLAMA_ROPE, common
from ms2mg_converter.source.families.registry import register

_LL = "model.layers.{layer}."
_W2_BIAS = (f"{_LL}feed_forward.w2.bias",)

TELECHAT2 = register(Family(
    name="telechat2",
    description="MindFormers TeleChat2 names: llama-style, with attention.wq + attention.wk_v (per KV head "
                "[k; v]) and biases on attention.wo and feed_forward.w2",
    recipes=(
        *common(_LL),
        Recipe(f"{QKV}.weight", QkvFromQAndKv, (f"{_LL}attention.wq.weight", f"{_LL}attention.wk_v.weight")),
        Recipe(f"{QKV}.bias", QkvFromQAndKv, (f"{_LL}attention.wq.bias", f"{_LL}attention.wk_v.bias")),
        Recipe(f"{QKV}.bias", QkvBiasZeros, (), requires=_W2_BIAS),
        Recipe(f"{PROJ}.bias", Copy, (f"{_LL}attention.wo.bias",)),
        Recipe(f"{PROJ}.bias", HiddenBiasZeros, (), requires=_W2_BIAS),
        Recipe(f"{FC1}.weight", GluSplit, (f"{_LL}feed_forward.w1.weight", f"{_LL}feed_forward.w3.weight")),
        Recipe(f"{FC1}.bias", Fc1BiasZeros, (), requires=_W2_BIAS),
        Recipe(f"{FC2}.bias", Copy, _W2_BIAS),
    ),
    facts=LLAMA_ROPE,
))
