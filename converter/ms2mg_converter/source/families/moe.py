"""MindFormers mcore MoE layer names (training_graph/transformer/moe/, master f52743ca, r1.7.0, r1.8.0).

shared/docs/mindformers-moe-mla-distributed.md §1.1: `mlp.router.weight [E, h]`, `mlp.router.expert_bias
[E]` (with `moe_router_enable_expert_bias`), the grouped `mlp.experts.weight1` / `weight2` (expanded per
expert by `source.experts`), `mlp.shared_experts.linear_fc1` (rows interleaved gate/up by default,
`use_interleaved_weight_layout_mlp`, as dense fc1: `--fc1-layout`) and `linear_fc2`, and
`shared_experts.shared_experts_gate.weight` (`use_shared_expert_gating`), which megatron-core's GPT spec
cannot hold (refused by `model.moe`). Dense layers (`first_k_dense_replace`) keep the dense MLP names.
Per-expert names are accepted too, already in Megatron's `(out, in)` layout with fc1 `[G; U]`: Megatron's
`mlp.experts.local_experts.{e}.linear_fc1/fc2.weight` (global e), and `mlp.experts.{e}.linear_fc1/fc2.weight`,
the name MindFormers' HF->MF converter uses before fusing (`ModelMixin.concat_expert_weight`, §1.1).
"""

from __future__ import annotations

from ms2mg_converter.layout import Copy
from ms2mg_converter.layout.moe import SharedGluFused
from ms2mg_converter.names import (
    EXPERT_BIAS,
    EXPERT_PREFIX,
    GROUPED_FC1,
    GROUPED_FC2,
    ROUTER,
    SHARED_FC1,
    SHARED_FC2,
    SHARED_GATE,
    L,
)
from ms2mg_converter.source.families.base import Recipe, same

_EXPERT = EXPERT_PREFIX + "{expert}.linear_fc"

MOE_RECIPES: tuple[Recipe, ...] = (
    *same(ROUTER, EXPERT_BIAS, GROUPED_FC1, GROUPED_FC2, f"{SHARED_FC2}.weight", SHARED_GATE),
    Recipe(f"{SHARED_FC1}.weight", SharedGluFused, (f"{SHARED_FC1}.weight",)),
    *(Recipe(f"{_EXPERT}{fc}.weight", Copy, (f"{source}{fc}.weight",))
      for fc in (1, 2) for source in (_EXPERT, f"{L}mlp.experts.{{expert}}.linear_fc")),
)
"""Recipes of a MindFormers mcore MoE layer (added to the mcore family's table)."""
