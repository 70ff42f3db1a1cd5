"""Key names of a MoE layer per rank file, and which experts an expert-parallel rank holds.

megatron-core 0.16.1 `MoELayer` state dict order (checked against a built GPTModel, local spec):
`mlp.router.weight`, `mlp.router.expert_bias` (with `moe_router_enable_expert_bias`), the routed experts,
then `mlp.shared_experts.linear_fc1/fc2` (+ `_extra_state`). Routed experts of EP rank e are the global
experts [e*El, (e+1)*El) renumbered 0..El-1 (shared/docs/mindformers-moe-mla-distributed.md §1.3-1.4):

* SequentialMLP (no `--moe-grouped-gemm`): `mlp.experts.local_experts.{k}.linear_fc1.weight` + `_extra_state`,
  same for linear_fc2;
* TEGroupedMLP (`--moe-grouped-gemm`, TransformerEngine): `mlp.experts.linear_fc1.weight{k}` for every k,
  then one `mlp.experts.linear_fc1._extra_state`, same for linear_fc2 ("Return for torch native ckpt").

Router and expert bias are replicated over TP and EP; experts split by the expert TP (= TP, the only size
the torch format's file names express) with the dense rules (fc1 GLU, fc2 row); shared experts by TP.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ms2mg_converter.model.arch import Architecture
from ms2mg_converter.names import EXPERT_BIAS, ROUTER, SHARED_FC1, SHARED_FC2, expert_name

if TYPE_CHECKING:
    from ms2mg_converter.plan.target import Slot


@dataclass(frozen=True)
class ExpertRank:
    """The expert-parallel rank a file is for, and the expert key layout."""

    rank: int = 0
    size: int = 1
    grouped: bool = False

    def local(self, experts: int) -> range:
        """The global experts this rank holds (local expert k is global `start + k`)."""
        per = experts // self.size
        return range(self.rank * per, (self.rank + 1) * per)


NO_EXPERTS = ExpertRank()


def moe_slots(arch: Architecture, j: int, layer: int, ep: ExpertRank) -> Iterator[Slot]:
    """A MoE layer's MLP entries (after its pre_mlp_layernorm), in megatron-core's order."""
    from ms2mg_converter.plan.target import EXTRA, Slot

    assert arch.moe is not None
    p = f"decoder.layers.{j}.mlp."
    yield Slot(p + "router.weight", ROUTER, layer)
    if arch.moe.moe_router_enable_expert_bias:
        yield Slot(p + "router.expert_bias", EXPERT_BIAS, layer)
    experts = ep.local(arch.moe.num_experts)
    if ep.grouped:
        for fc in (1, 2):
            for k, x in enumerate(experts):
                yield Slot(f"{p}experts.linear_fc{fc}.weight{k}", expert_name(x, fc), layer)
            yield Slot(f"{p}experts.linear_fc{fc}.{EXTRA}", None, layer)
    else:
        for k, x in enumerate(experts):
            for fc in (1, 2):
                yield Slot(f"{p}experts.local_experts.{k}.linear_fc{fc}.weight", expert_name(x, fc), layer)
                yield Slot(f"{p}experts.local_experts.{k}.linear_fc{fc}.{EXTRA}", None, layer)
    if arch.moe.moe_shared_expert_intermediate_size is not None:
        for shared in (SHARED_FC1, SHARED_FC2):
            yield Slot(f"{p}shared_experts.{shared.rsplit('.', 1)[1]}.weight", f"{shared}.weight", layer)
            yield Slot(f"{p}shared_experts.{shared.rsplit('.', 1)[1]}.{EXTRA}", None, layer)


def expert_problems(arch: Architecture, tp: int, ep: int, etp: int | None) -> list[str]:
    """Why this model cannot be split at this EP / expert TP (empty: it can)."""
    problems = []
    moe = arch.moe
    if moe is None:
        return ["the model has no experts (no mlp.router.weight)"] if ep > 1 else []
    if moe.num_experts % ep:
        problems.append(f"--target-expert-parallel-size {ep} does not divide the {moe.num_experts} experts")
    if etp is not None and etp != tp:
        problems.append(f"--target-expert-tensor-parallel-size {etp} differs from the tensor-parallel size {tp}: "
                        "the torch format's file names (mp_rank_TT[_PPP]_EEE) hold one TP rank each, so only "
                        "expert TP = TP is expressible")
    if moe.moe_ffn_hidden_size % tp:
        problems.append(f"tensor-parallel size {tp} does not divide the expert width {moe.moe_ffn_hidden_size}")
    shared = moe.moe_shared_expert_intermediate_size
    if shared is not None and shared % tp:
        problems.append(f"tensor-parallel size {tp} does not divide the shared-expert width {shared}")
    return problems
