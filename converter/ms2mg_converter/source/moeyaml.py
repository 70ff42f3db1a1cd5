"""MoE values from a MindFormers model YAML (`model.model_config`), beside `mfyaml`'s dense ones.

MindFormers' mcore TransformerConfig uses Megatron's names (`num_moe_experts`, `moe_router_topk`,
`moe_ffn_hidden_size`, `moe_shared_expert_intermediate_size`, `moe_router_score_function`,
`moe_router_topk_scaling_factor`, `moe_router_num_groups`, `moe_router_group_topk`, `moe_router_pre_softmax`,
`first_k_dense_replace`); its HF-style model configs (DeepSeek-V3, Qwen3-MoE) spell them `n_routed_experts` /
`num_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `scoring_func`, `routed_scaling_factor`,
`n_group`, `topk_group` (shared/docs/mindformers-moe-mla-distributed.md §1.6, §4). Qwen3-MoE's
`norm_topk_prob: False` is Megatron's `moe_router_pre_softmax: True` (softmax over all experts, top-k not
renormalised). The sizes are cross-checked with the tensors; the router facts fill `MoeConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ms2mg_converter.config import MoeConfig
from ms2mg_converter.errors import UsageError

SIZES: dict[str, tuple[str, ...]] = {
    "num_experts": ("num_moe_experts", "n_routed_experts", "num_experts"),
    "moe_ffn_hidden_size": ("moe_ffn_hidden_size", "moe_intermediate_size"),
    "moe_shared_expert_intermediate_size": ("moe_shared_expert_intermediate_size",),
    "first_k_dense_replace": ("first_k_dense_replace",),
    "moe_router_enable_expert_bias": ("moe_router_enable_expert_bias",),
}
ROUTER: dict[str, tuple[str, ...]] = {
    "router_topk": ("moe_router_topk", "num_experts_per_tok"),
    "router_score_function": ("moe_router_score_function", "scoring_func"),
    "router_topk_scaling_factor": ("moe_router_topk_scaling_factor", "routed_scaling_factor"),
    "router_num_groups": ("moe_router_num_groups", "n_group"),
    "router_group_topk": ("moe_router_group_topk", "topk_group"),
    "router_pre_softmax": ("moe_router_pre_softmax",),
}


def _first(section: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((section[n] for n in names if section.get(n) is not None), None)


def read_moe_yaml(path: Path) -> tuple[MoeConfig, dict[str, int]]:  # bools are ints: the expert-bias flag too
    """(router facts, sizes to cross-check) the YAML states; missing ones stay None / absent."""
    from ms2mg_converter.source.mfyaml import _model_section

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: cannot read the MindFormers YAML ({e}).") from e
    section = _model_section(doc) if isinstance(doc, dict) else {}
    sizes = {k: v for k, names in SIZES.items() if isinstance(v := _first(section, names), int)}
    router = {k: v for k, names in ROUTER.items() if (v := _first(section, names)) is not None}
    norm = section.get("norm_topk_prob")
    if "router_pre_softmax" not in router and isinstance(norm, bool) and router.get("router_score_function",
                                                                                      "softmax") == "softmax":
        router["router_pre_softmax"] = not norm
    try:
        return MoeConfig(**router), sizes
    except ValueError as e:
        raise UsageError(f"--config {path}: MoE values are invalid: {e}") from e
