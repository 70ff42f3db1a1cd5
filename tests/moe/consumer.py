"""megatron-core 0.16.1 as the consumer of converted MoE checkpoints, on CPU (see
shared/docs/megatron-core-as-test-consumer.md and tests/converter/megatron_consumer.py).

The model of every (tp, ep) rank file is a GPTModel built from the checkpoint's own `args` with megatron-core's
MoE decoder block spec (local implementation: SequentialMLP experts), size-only process groups saying the
rank's TP/EP position, and the file's `model` dict loaded with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tests.converter.megatron_consumer import SizeOnlyGroup, ensure_single_process_state, load_rank_file, te_like


def config_from_args(args: argparse.Namespace, dtype: torch.dtype) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, gated_linear_unit=args.swiglu, activation_func=F.silu,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias, qk_layernorm=args.qk_layernorm,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        # args say sequence_parallel for TP > 1 (Megatron-LM requires it with MoE); it changes no weight, and the
        # local spec's torch norms refuse it, so the CPU model is built without it
        sequence_parallel=False,
        num_moe_experts=args.num_experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_layer_freq=args.moe_layer_freq, moe_router_topk=args.moe_router_topk,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_router_num_groups=args.moe_router_num_groups, moe_router_group_topk=args.moe_router_group_topk,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_grouped_gemm=args.moe_grouped_gemm, moe_token_dispatcher_type="allgather",
        params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=True, perform_initialization=False,
        attention_dropout=0.0, hidden_dropout=0.0,
    )


def build_rank_model(args: argparse.Namespace, t: int, e: int, dtype: torch.dtype = torch.bfloat16) -> Any:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.process_groups_config import ProcessGroupCollection

    ensure_single_process_state()
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    config = config_from_args(args, dtype)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization)
    g = SizeOnlyGroup
    groups = ProcessGroupCollection(tp=g(tp, t), pp=g(1, 0), cp=g(1, 0), ep=g(ep, e), expt_tp=g(tp, t),
                                    expt_dp=g(1, 0), tp_ep=g(tp * ep, e * tp + t), tp_cp=g(tp, t), dp=g(1, 0),
                                    tp_dp_cp=g(tp, t), embd=None, pos_embd=None)
    model = GPTModel(config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                     max_sequence_length=args.max_position_embeddings, pg_collection=groups,
                     position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    return te_like(model, "final-norm")  # the final norm's TE _extra_state, as Megatron with TE writes it


def rank_files(root: Path) -> dict[str, Path]:
    return {d.name: d / "model_optim_rng.pt" for d in sorted((root / "iter_0000001").iterdir())}


def strict_load_all(root: Path, dtype: torch.dtype = torch.bfloat16) -> dict[tuple[int, int], Any]:
    """Every rank file into its megatron-core model, strictly; (tp rank, ep rank) -> model."""
    models = {}
    for name, path in rank_files(root).items():
        sd = load_rank_file(path)
        args = sd["args"]
        tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
        parts = [int(p) for p in name.removeprefix("mp_rank_").split("_")]
        t, e = parts[0], (parts[-1] if ep > 1 else 0)
        assert len(parts) == 1 + (ep > 1), name
        model = build_rank_model(args, t, e, dtype)
        result = model.load_state_dict(sd["model"], strict=True)
        assert not result.missing_keys and not result.unexpected_keys, (name, result)
        models[(t, e)] = model
        assert t < tp and e < ep
    return models


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    import megatron.core.transformer.moe.moe_utils as moe_utils

    from tests.converter.megatron_consumer import install_cpu_patches

    install_cpu_patches()
    if not hasattr(moe_utils, "te_general_gemm"):  # 0.16.1 names it only when TransformerEngine imports
        moe_utils.te_general_gemm = None
    model.eval()
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return model(ids, pos, attention_mask=None).float()  # type: ignore[no-any-return]
