"""Mixture-of-experts flags (`MoeConfig`): the output's expert layout and parallelism, and router facts."""

from __future__ import annotations

import argparse

from ms2mg_converter.config import MoeConfig


def add_moe_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts (experts, router and shared experts are inferred from the tensors)")
    g.add_argument("--target-expert-parallel-size", "--ep", dest="expert_parallel", type=int, default=1,
                   metavar="N", help="expert-parallel size of the output: rank files mp_rank_TT[_PPP]_EEE, each "
                                     "holding num_experts/N experts renumbered from 0 (default 1)")
    g.add_argument("--target-expert-tensor-parallel-size", dest="expert_tensor_parallel", type=int, default=None,
                   metavar="N", help="expert tensor-parallel size; must equal the tensor-parallel size (the "
                                     "default), the only one the torch format's file names express")
    g.add_argument("--moe-grouped-gemm", dest="grouped_gemm", action="store_true",
                   help="write experts as TEGroupedMLP (mlp.experts.linear_fc1.weight0..) for Megatron's "
                        "--moe-grouped-gemm with TransformerEngine; default SequentialMLP (local_experts.N)")
    g.add_argument("--moe-router-topk", dest="router_topk", type=int, default=None, metavar="K",
                   help="experts per token (needed for a MoE model: flag or --config moe_router_topk / "
                        "num_experts_per_tok)")
    g.add_argument("--moe-router-score-function", dest="router_score_function", choices=("softmax", "sigmoid"),
                   default=None, help="router score function (default softmax, reported as defaulted)")
    g.add_argument("--moe-router-topk-scaling-factor", dest="router_topk_scaling_factor", type=float,
                   default=None, metavar="F", help="scale of the routing weights (DeepSeek routed_scaling_factor)")
    g.add_argument("--moe-router-num-groups", dest="router_num_groups", type=int, default=None, metavar="N",
                   help="expert groups for group-limited routing (DeepSeek n_group)")
    g.add_argument("--moe-router-group-topk", dest="router_group_topk", type=int, default=None, metavar="N",
                   help="groups selected per token (DeepSeek topk_group)")
    g.add_argument("--moe-router-pre-softmax", dest="router_pre_softmax", action=argparse.BooleanOptionalAction,
                   default=None, help="softmax before top-k (top-k weights not renormalised; Qwen3-MoE "
                                      "norm_topk_prob: False)")


def moe_config(ns: argparse.Namespace) -> MoeConfig:
    return MoeConfig(**{name: getattr(ns, name) for name in MoeConfig.model_fields})
