"""MindFormers' fused row orders, written from its source (read for facts; no MindFormers code copied).

- `qkv_contiguous`: [Q;K;V]. With a source TP t each rank splits its own slice, so the merged tensor is
  [Q_0;K_0;V_0; Q_1;K_1;V_1; ...]: r1.3 `LLamaAttention` (`split_qkv = SplitWithSize` sized
  (hidden, kv_dim, kv_dim) with `skip_redistribution` and shard ((dp, 1, mp),)), mcore
  `SelfAttentionContiguous` (r1.6/dev), whose own accuracy test
  tests/st/test_ut/test_parallel_core/test_training_graph/test_transformer/test_attention/test_self_attention/
  run_self_attention.py `transform_megatron_weight_to_mf(..., tensor_parallel)` builds exactly this order.
- `qkv_grouped`: mindformers/utils/convert_utils.py `qkv_concat_hf2mg` (concat [Q;K;V], reshape Q, K, V to
  (n_kv_heads, rows/n_kv_heads, -1), concatenate along axis 1): per query group [Q_g; K_g; V_g], which
  llama_transformer.py (r1.4+) reads back with reshape (bs, seq, n_kv_head, (n_rep + 2) * head_dim).
- `gate_up`: [gate; up], per source TP rank [G_r; U_r] (r1.3 `LlamaFeedForward`: `SplitWithSize`
  (hidden_dim, hidden_dim) with `skip_redistribution`, shard ((dp, 1, mp),)).
- `gate_up_interleaved`: convert_utils.py `ffn_concat_hf2mg` (gate and up reshaped to (ffn, 1, -1),
  concatenated on axis 1): rows g0, u0, g1, u1, ... as read back by llama_layer.py (r1.4+, reshape
  (bs, seq, hidden_dim, 2), split (1, 1)) and by mcore `MLPInterleaved` (r1.7+, reshape (..., ffn, 2)).
- `kv_per_head`: TeleChat2 `wk_v`, per KV head [k_h; v_h] (research/telechat2 attention: reshape
  (-1, n_kv_head, head_dim * 2), split (head_dim, head_dim); convert_weight.py `transformer_new_kv_param`
  takes even head_dim blocks as K and odd ones as V).
"""

from __future__ import annotations

import torch


def qkv_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source_tp: int = 1) -> torch.Tensor:
    parts = []
    for r in range(source_tp):
        parts += [q.chunk(source_tp)[r], k.chunk(source_tp)[r], v.chunk(source_tp)[r]]
    return torch.cat(parts)


def qkv_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    rest = q.shape[1:]
    per_group = [x.reshape(groups, -1, *rest) for x in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def gate_up(gate: torch.Tensor, up: torch.Tensor, source_tp: int = 1) -> torch.Tensor:
    parts = []
    for r in range(source_tp):
        parts += [gate.chunk(source_tp)[r], up.chunk(source_tp)[r]]
    return torch.cat(parts)


def gate_up_interleaved(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.stack([gate, up], dim=1).reshape(-1, *gate.shape[1:])


def kv_per_head(k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    rest = k.shape[1:]
    return torch.stack([k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)], dim=1).reshape(-1, *rest)
