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


# Mixture of experts (megatron-core MoELayer; shared/docs/mindformers-moe-mla-distributed.md §1)
ROUTER = f"{L}mlp.router.weight"
EXPERT_BIAS = f"{L}mlp.router.expert_bias"
GROUPED_FC1 = f"{L}mlp.experts.weight1"
"""MindFormers' (and legacy GroupedMLP's) grouped fc1 of all experts; a source name, expanded per expert."""
GROUPED_FC2 = f"{L}mlp.experts.weight2"
SHARED_FC1 = f"{L}mlp.shared_experts.linear_fc1"
SHARED_FC2 = f"{L}mlp.shared_experts.linear_fc2"
SHARED_GATE = f"{L}mlp.shared_experts.shared_experts_gate.weight"
EXPERT_PREFIX = f"{L}mlp.experts.local_experts."
"""Canonical (TP1/EP1) name of routed expert x: `{EXPERT_PREFIX}{x}.linear_fc1.weight` (x global)."""


def expert_name(x: int, fc: int) -> str:
    """The canonical name of global expert `x`'s linear_fc1 (fc=1) or linear_fc2 (fc=2) weight."""
    return f"{EXPERT_PREFIX}{x}.linear_fc{fc}.weight"

# Multi-latent attention (DeepSeek-V2/V3 MLA; megatron-core MLASelfAttention): the q_layernorm is Q_NORM.
MLA_Q = f"{L}self_attention.linear_q_proj"
MLA_Q_DOWN = f"{L}self_attention.linear_q_down_proj"
MLA_Q_UP = f"{L}self_attention.linear_q_up_proj"
MLA_KV_DOWN = f"{L}self_attention.linear_kv_down_proj"
MLA_KV_UP = f"{L}self_attention.linear_kv_up_proj"
MLA_KV_NORM = f"{L}self_attention.kv_layernorm"
MLA_LINEARS = (MLA_Q, MLA_Q_DOWN, MLA_Q_UP, MLA_KV_DOWN, MLA_KV_UP)
