"""Megatron-core's canonical tensor names (the TP1/PP1 `GPTModel` names, `{layer}` for the global layer).

The vocabulary every stage shares: the family tables map source names onto these, the architecture is
inferred from them, and the target layout places them into rank files.
"""

from __future__ import annotations

L = "decoder.layers.{layer}."
"""Prefix of a decoder layer's tensors; `{layer}` is the global layer number."""

EMBED = "embedding.word_embeddings.weight"
POS = "embedding.position_embeddings.weight"
FINAL = "decoder.final_layernorm"
OUTPUT = "output_layer.weight"
QKV = f"{L}self_attention.linear_qkv"
PROJ = f"{L}self_attention.linear_proj"
FC1 = f"{L}mlp.linear_fc1"
FC2 = f"{L}mlp.linear_fc2"
INPUT_NORM = f"{L}input_layernorm"
MLP_NORM = f"{L}pre_mlp_layernorm"
NORMS = (INPUT_NORM, MLP_NORM)
Q_NORM = f"{L}self_attention.q_layernorm"
K_NORM = f"{L}self_attention.k_layernorm"
QK_NORMS = (Q_NORM, K_NORM)


def fill(template: str, layer: int | None) -> str:
    """A template with its layer number filled in."""
    return template if layer is None else template.replace("{layer}", str(layer))

# Multi-latent attention (DeepSeek-V2/V3 MLA; megatron-core MLASelfAttention): the q_layernorm is Q_NORM.
MLA_Q = f"{L}self_attention.linear_q_proj"
MLA_Q_DOWN = f"{L}self_attention.linear_q_down_proj"
MLA_Q_UP = f"{L}self_attention.linear_q_up_proj"
MLA_KV_DOWN = f"{L}self_attention.linear_kv_down_proj"
MLA_KV_UP = f"{L}self_attention.linear_kv_up_proj"
MLA_KV_NORM = f"{L}self_attention.kv_layernorm"
MLA_LINEARS = (MLA_Q, MLA_Q_DOWN, MLA_Q_UP, MLA_KV_DOWN, MLA_KV_UP)
