"""Mixture-of-experts architecture: inferred from the MoE layers' tensors, router facts from flags/YAML.

From the headers (shared/docs/mindformers-moe-mla-distributed.md §1.1): which layers are MoE (those with
`mlp.router.weight`; the others are dense, MindFormers' `first_k_dense_replace`), the number of experts E
(router rows), the expert width F (per-expert fc2 columns), the shared-expert width Fs and whether the
router has an expert bias. What the tensors cannot tell is the routing: `moe_router_topk` changes every
output, so it must be stated (`--moe-router-topk`, or the YAML's `moe_router_topk` / `num_experts_per_tok`)
and is refused otherwise; the score function, top-k scaling, group routing and pre-softmax fall back to
Megatron's defaults and are reported as defaulted, like the rotary base (`model.facts`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ms2mg_converter.config import MoeConfig
from ms2mg_converter.errors import MissingKeyError, ShapeError, UsageError
from ms2mg_converter.names import (
    EXPERT_BIAS,
    EXPERT_PREFIX,
    FC1,
    FC2,
    ROUTER,
    SHARED_FC1,
    SHARED_FC2,
    SHARED_GATE,
    L,
    expert_name,
)
from ms2mg_converter.source.resolve import SourceView

ROUTER_DEFAULTS: dict[str, object] = {
    "router_score_function": "softmax",
    "router_topk_scaling_factor": None,
    "router_num_groups": None,
    "router_group_topk": None,
    "router_pre_softmax": False,
}
"""Megatron's defaults (TransformerConfig) for the router facts the tensors cannot tell."""


class MoeArch(BaseModel):
    """The MoE part of the architecture (None on a dense model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_experts: int
    moe_ffn_hidden_size: int
    moe_shared_expert_intermediate_size: int | None
    moe_layer_freq: tuple[int, ...]
    """Per layer: 1 MoE, 0 dense (Megatron's `--moe-layer-freq` list)."""
    moe_router_enable_expert_bias: bool
    moe_router_topk: int
    moe_router_score_function: str
    moe_router_topk_scaling_factor: float | None
    moe_router_num_groups: int | None
    moe_router_group_topk: int | None
    moe_router_pre_softmax: bool
    defaulted: tuple[str, ...] = ()

    def is_moe(self, layer: int) -> bool:
        return self.moe_layer_freq[layer] == 1


def is_mlp(target: str) -> bool:
    """Whether a canonical tensor belongs to a layer's MLP (dense or MoE: the part that may differ by layer)."""
    return target.startswith(f"{L}mlp.")


def moe_layers(view: SourceView) -> list[int]:
    return [layer for layer in view.layers if view.get(ROUTER, layer) is not None]


def first_dense_layer(view: SourceView) -> int | None:
    """The first layer with a dense MLP (None: every layer is MoE)."""
    return next((layer for layer in view.layers if view.get(FC2 + ".weight", layer) is not None), None)


def _shape(view: SourceView, target: str, layer: int) -> tuple[int, ...] | None:
    logical = view.get(target, layer)
    if logical is None:
        return None
    return logical.recipe.op.logical_shape([i.shape for i in logical.inputs])


def _need(view: SourceView, target: str, layer: int, shape: tuple[int, ...], why: str) -> None:
    got = _shape(view, target, layer)
    name = target.replace("{layer}", str(layer))
    if got is None:
        raise MissingKeyError(f"MoE layer {layer} has no {name} ({why}); the checkpoint is incomplete.")
    if got != shape:
        raise ShapeError(f"tensor {name} has shape {list(got)}, expected {list(shape)} ({why}).")


def _layer_sizes(view: SourceView, layer: int, hidden: int) -> tuple[int, int, int | None, bool]:
    if view.get(SHARED_GATE, layer) is not None:
        raise UsageError(f"layer {layer} has {SHARED_GATE.replace('{layer}', str(layer))} (MindFormers "
                         "use_shared_expert_gating): megatron-core's GPT MoE layer has no shared-expert gate, so "
                         "this model cannot be converted.")
    dense = [n for n in (FC1, FC2) if view.get(n + ".weight", layer) is not None]
    if dense:
        raise ShapeError(f"layer {layer} has both a MoE router and a dense {dense[0].replace('{layer}', str(layer))}"
                         ".weight; megatron-core's MoE layer cannot hold both.")
    router = _shape(view, ROUTER, layer)
    if router is None or len(router) != 2 or router[1] != hidden:
        raise ShapeError(f"mlp.router.weight of layer {layer} has shape {list(router or ())}, expected "
                         f"[experts, {hidden}].")
    experts = router[0]
    for fc in (1, 2):
        if view.get(expert_name(0, fc), layer) is None:
            raise MissingKeyError(f"MoE layer {layer} has mlp.router.weight but no decoder.layers.{layer}.mlp."
                                  f"experts.weight{fc} (the routed experts' linear_fc{fc}); the checkpoint is "
                                  "incomplete (a shard missing from --load-dir?).")
    ffn = (_shape(view, expert_name(0, 2), layer) or (0, 0))[1]
    names = [t for (t, lay) in view.logical if lay == layer and t.startswith(EXPERT_PREFIX)]
    if len(names) != 2 * experts:
        raise ShapeError(f"MoE layer {layer} holds {len(names)} routed-expert tensors but mlp.router.weight has "
                         f"{experts} rows (experts); expected linear_fc1 and linear_fc2 of experts 0..{experts - 1}.")
    for x in range(experts):
        _need(view, expert_name(x, 1), layer, (2 * ffn, hidden), f"expert {x}: [gate; up] of width {ffn}")
        _need(view, expert_name(x, 2), layer, (hidden, ffn), f"expert {x}: hidden x width {ffn}")
    bias = view.get(EXPERT_BIAS, layer) is not None
    if bias:
        _need(view, EXPERT_BIAS, layer, (experts,), "one value per expert")
    shared = _shape(view, f"{SHARED_FC2}.weight", layer)
    if shared is not None:
        _need(view, f"{SHARED_FC1}.weight", layer, (2 * shared[1], hidden), "shared experts: [gate; up]")
    return experts, ffn, None if shared is None else shared[1], bias


def _router(given: MoeConfig) -> tuple[dict[str, object], tuple[str, ...]]:
    if given.router_topk is None:
        raise UsageError("the number of experts each token is routed to cannot be read from the tensors: pass "
                         "--moe-router-topk N, or --config MODEL.yaml stating moe_router_topk (or "
                         "num_experts_per_tok).")
    values: dict[str, object] = {"moe_router_topk": given.router_topk}
    defaulted = []
    for name, default in ROUTER_DEFAULTS.items():
        value = getattr(given, name)
        if value is None:
            value = default
            defaulted.append(f"moe_{name}")
        values[f"moe_{name}"] = value
    return values, tuple(defaulted)


def infer_moe(view: SourceView, hidden: int, given: MoeConfig, yaml_sizes: dict[str, int]) -> MoeArch | None:
    """The MoE architecture (None: no layer has a router); every MoE layer must agree."""
    layers = moe_layers(view)
    if not layers:
        return None
    sizes = {layer: _layer_sizes(view, layer, hidden) for layer in layers}
    first = sizes[layers[0]]
    for layer, here in sizes.items():
        if here != first:
            raise ShapeError(f"MoE layers {layers[0]} and {layer} differ (experts, expert width, shared width, "
                             f"expert bias: {first} vs {here}); Megatron needs every MoE layer alike.")
    experts, ffn, shared, bias = first
    freq = tuple(1 if layer in sizes else 0 for layer in view.layers)
    stated = {"num_experts": experts, "moe_ffn_hidden_size": ffn, "first_k_dense_replace": freq.index(1),
              "moe_router_enable_expert_bias": bias}
    if shared is not None:
        stated["moe_shared_expert_intermediate_size"] = shared
    wrong = [f"{k} {v} but the tensors say {stated[k]}" for k, v in yaml_sizes.items() if k in stated
             and v != stated[k]]
    if wrong:
        raise ShapeError("the --config YAML contradicts the checkpoint: " + "; ".join(wrong) + ".")
    router, defaulted = _router(given)
    if given.router_topk is not None and given.router_topk > experts:
        raise UsageError(f"--moe-router-topk {given.router_topk} is more than the {experts} experts.")
    return MoeArch(num_experts=experts, moe_ffn_hidden_size=ffn, moe_shared_expert_intermediate_size=shared,
                   moe_layer_freq=freq, moe_router_enable_expert_bias=bias, defaulted=defaulted,
                   **router)


def moe_args(moe: MoeArch | None, tp: int, ep: int, grouped: bool) -> dict[str, object]:
    """The checkpoint `args` fields of MoE (§1.6): what `--use-checkpoint-args` restores (num_experts,
    moe_layer_freq, moe_ffn_hidden_size, moe_router_topk, moe_router_pre_softmax, moe_grouped_gemm,
    moe_shared_expert_intermediate_size, moe_token_dispatcher_type) and the rest for the record."""
    if moe is None:
        return {"expert_model_parallel_size": 1, "num_experts": None, "sequence_parallel": False}
    return {
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": tp,
        "num_experts": moe.num_experts,
        "moe_layer_freq": list(moe.moe_layer_freq),
        "moe_ffn_hidden_size": moe.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": moe.moe_shared_expert_intermediate_size,
        "moe_router_topk": moe.moe_router_topk,
        "moe_router_score_function": moe.moe_router_score_function,
        "moe_router_topk_scaling_factor": moe.moe_router_topk_scaling_factor,
        "moe_router_num_groups": moe.moe_router_num_groups,
        "moe_router_group_topk": moe.moe_router_group_topk,
        "moe_router_pre_softmax": moe.moe_router_pre_softmax,
        "moe_router_enable_expert_bias": moe.moe_router_enable_expert_bias,
        "moe_grouped_gemm": grouped,
        "moe_use_legacy_grouped_gemm": False,
        "moe_token_dispatcher_type": "allgather",  # Megatron-LM's default: a run-time choice, no weight depends on it
        "sequence_parallel": tp > 1,
    }
