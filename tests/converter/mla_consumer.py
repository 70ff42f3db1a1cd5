"""megatron-core 0.16.1's MLA GPTModel on CPU, for strict loads and logits of converted MLA checkpoints.

The local layer spec with `multi_latent_attention=True` builds `MLASelfAttention`, whose core attention gets
`k_channels`/`v_channels` (q/k head dim dqk+dr differs from the value head dim): the local
`DotProductAttention` of 0.16.1 takes neither, and TransformerEngine's has no CPU build. `CausalAttention`
below stands in for it: plain causal softmax attention with megatron's `softmax_scale` (it has no
parameters, so the state dict is megatron's own). `multi_latent_attention.HAVE_TE` is set False because TE
is importable-but-absent here and MLASelfAttention otherwise calls isinstance() on its None classes.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F


class CausalAttention(torch.nn.Module):
    """[s, b, nh, dq] query/key, [s, b, nh, dv] value -> [s, b, nh*dv], causal."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 softmax_scale: float | None = None, k_channels: int | None = None,
                 v_channels: int | None = None, cp_comm_type: Any = None, pg_collection: Any = None) -> None:
        super().__init__()
        self.scale = softmax_scale if softmax_scale is not None else (k_channels or 1) ** -0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                **_: Any) -> torch.Tensor:
        q, k, v = (x.permute(1, 2, 0, 3).float() for x in (query, key, value))
        s = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [b, nh, s, dv]
        return out.permute(2, 0, 1, 3).reshape(s, q.shape[0], -1).to(query.dtype)


def mla_model_setup(args: argparse.Namespace, dtype: torch.dtype, virtual: int | None) -> tuple[Any, dict[str, Any]]:
    """`MLATransformerConfig` and GPTModel arguments from the checkpoint's `args` alone."""
    import megatron.core.transformer.multi_latent_attention as mla_module
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    mla_module.HAVE_TE = False  # type: ignore[attr-defined]
    fields = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
              "rotary_base", "rotary_scaling_factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim")
    config = MLATransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu, add_bias_linear=args.add_bias_linear,
        qk_layernorm=args.qk_layernorm, normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False, attention_dropout=0.0, hidden_dropout=0.0,
        **{f: getattr(args, f) for f in fields},
    )
    spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm,
                                    multi_latent_attention=True)
    spec.submodules.self_attention.submodules.core_attention = CausalAttention
    kwargs = {"transformer_layer_spec": spec, "vocab_size": args.padded_vocab_size,
              "max_sequence_length": args.max_position_embeddings, "position_embedding_type": "rope",
              "rotary_base": args.rotary_base,
              "share_embeddings_and_output_weights": not args.untie_embeddings_and_output_weights}
    return config, kwargs
