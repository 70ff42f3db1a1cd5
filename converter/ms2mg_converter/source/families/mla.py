"""MindFormers multi-latent attention (MLA) names, both variants, as recipes of the mcore family.

From mindformers/parallel_core/training_graph/transformer/multi_latent_attention.py (master f52743ca, also
r1.7.0/r1.8.0; mindformers-moe-mla-distributed.md §2.1), chosen by `mla_qkv_concat`:

* `mla_qkv_concat: False` ("Megatron structure", TeleChat3 and the DeepSeek HF->MF converters): Megatron's
  names, `self_attention.linear_q_proj` (no q compression) or `linear_q_down_proj` + `q_layernorm` +
  `linear_q_up_proj`, then `linear_kv_down_proj` + `kv_layernorm` + `linear_kv_up_proj`, `linear_proj`.
* `mla_qkv_concat: True` (the default): `self_attention.linear_qkv` = `[q_down ; kv_down]` (or
  `[q_proj ; kv_down]`), `linear_qb` = linear_q_up_proj, `linear_kvb` = linear_kv_up_proj, `q_layernorm`, and
  `k_layernorm`, which normalises the compressed KV (= Megatron's kv_layernorm).

A fused `linear_qkv` is MLA only beside `linear_kvb` (the `requires` below); without it it is the GQA
`linear_qkv` of the dense recipes. Both `linear_q_down_proj` and `linear_q_proj` recipes apply to a fused
`linear_qkv`; the architecture (`model.mla`: `linear_qb` present or not) decides which one is placed.
"""

from __future__ import annotations

from ms2mg_converter.layout import Copy, MlaFusedKv, MlaFusedQ
from ms2mg_converter.names import K_NORM, MLA_KV_DOWN, MLA_KV_NORM, MLA_KV_UP, MLA_Q, MLA_Q_DOWN, MLA_Q_UP, QKV
from ms2mg_converter.source.families.base import Recipe, same

_A = "decoder.layers.{layer}.self_attention."

MLA_RECIPES: tuple[Recipe, ...] = (
    *same(f"{MLA_Q}.weight", f"{MLA_Q_DOWN}.weight", f"{MLA_Q_UP}.weight", f"{MLA_KV_DOWN}.weight",
          f"{MLA_KV_UP}.weight", f"{MLA_KV_NORM}.weight"),
    Recipe(f"{MLA_Q_UP}.weight", Copy, (f"{_A}linear_qb.weight",)),
    Recipe(f"{MLA_KV_UP}.weight", Copy, (f"{_A}linear_kvb.weight",)),
    Recipe(f"{MLA_Q_DOWN}.weight", MlaFusedQ, (f"{QKV}.weight",), requires=(f"{_A}linear_qb.weight",)),
    Recipe(f"{MLA_Q}.weight", MlaFusedQ, (f"{QKV}.weight",), requires=(f"{_A}linear_kvb.weight",)),
    Recipe(f"{MLA_KV_DOWN}.weight", MlaFusedKv, (f"{QKV}.weight",), requires=(f"{_A}linear_kvb.weight",)),
    Recipe(f"{MLA_KV_NORM}.weight", Copy, (f"{K_NORM}.weight",), requires=(f"{_A}linear_kvb.weight",)),
)
"""Megatron MLA tensors from either MindFormers variant (the q_layernorm is the mcore family's own)."""
