"""MindFormers mcore MoE layer names (training_graph/transformer/moe/, master f52743ca, r1.7.0, r1.8.0).

shared/docs/mindformers-moe-mla-distributed.md §1.1: `mlp.router.weight [E, h]`, `mlp.router.expert_bias
[E]` (with `moe_router_enable_expert_bias`), the grouped `mlp.experts.weight1` / `weight2` (expanded per
expert by `source.experts`), `mlp.shared_experts.linear_fc1` (rows interleaved gate/up by default,
`use_interleaved_weight_layout_mlp`, as dense fc1: `--fc1-layout`) and `linear_fc2`, and
`shared_experts.shared_experts_gate.weight` (`use_shared_expert_gating`), which megatron-core's GPT spec
cannot hold (refused by `model.moe`). Dense layers (`first_k_dense_replace`) keep the dense MLP names.
"""

from __future__ import annotations

from ms2mg_converter.layout.moe import SharedGluFused
from ms2mg_converter.names import (
    EXPERT_BIAS,
    GROUPED_FC1,
    GROUPED_FC2,
    ROUTER,
    SHARED_FC1,
    SHARED_FC2,
    SHARED_GATE,
)
from ms2mg_converter.source.families.base import Recipe, same

MOE_RECIPES: tuple[Recipe, ...] = (
    *same(ROUTER, EXPERT_BIAS, GROUPED_FC1, GROUPED_FC2, f"{SHARED_FC2}.weight", SHARED_GATE),
    Recipe(f"{SHARED_FC1}.weight", SharedGluFused, (f"{SHARED_FC1}.weight",)),
)
"""Recipes of a MindFormers mcore MoE layer (added to the mcore family's table)."""
