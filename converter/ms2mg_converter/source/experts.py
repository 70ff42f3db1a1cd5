"""MindFormers' grouped routed experts, expanded into one canonical Megatron tensor per expert.

MindFormers (mcore, r1.6+) always stores a MoE layer's routed experts as two grouped tensors
(shared/docs/mindformers-moe-mla-distributed.md §1.1-1.2; `FFNGroupedGEMM`, moe_module_specs.py refuses
`moe_grouped_gemm: False`): `mlp.experts.weight1` is the flat memory of `[E, h, 2F]` (r1.7+ stores it as
`[E*h, 2F]`, dev/r1.6 as `[h, E*2F]`: the same bytes), expert e's block being `[G_e^T | U_e^T]`, and
`mlp.experts.weight2` the flat memory of `[E, F, h]`. The only rule that holds for every version is the
element count: block e of weight1 is `h x 2F` values at element offset `e*h*2F`, its transpose is Megatron's
`linear_fc1` `[G; U]` of expert e; block e of weight2 is `F x h`, its transpose `linear_fc2` `[h, F]`.

Each expert becomes a `Logical` named `decoder.layers.L.mlp.experts.local_experts.e.linear_fc{1,2}.weight`
(global e) whose input is that block (`TensorInfo.block`, read transposed by the executor). E and h come
from `mlp.router.weight` `[E, h]` of the same layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import TYPE_CHECKING

from ms2mg_converter.errors import MissingKeyError, ShapeError, SourceError
from ms2mg_converter.layout import Copy
from ms2mg_converter.names import GROUPED_FC1, GROUPED_FC2, ROUTER, expert_name, fill
from ms2mg_converter.source.families.base import Recipe
from ms2mg_converter.source.index import TensorInfo

if TYPE_CHECKING:
    from ms2mg_converter.source.resolve import Logical

Key = tuple[str, int | None]


def _blocks(info: TensorInfo, experts: int, hidden: int, fc: int) -> list[TensorInfo]:
    if info.pieces:
        raise SourceError(f"grouped expert tensor {info.name} is cut over the rank files of a distributed source; "
                          "ms2mg reads grouped experts from a merged checkpoint only: merge the source first "
                          "(MindSpore's unified_safetensors) or save it with per-expert names.")
    numel = math.prod(info.shape)
    per = numel // experts if experts else 0
    if len(info.shape) != 2 or not per or numel % experts or per % hidden or (fc == 1 and (per // hidden) % 2):
        what = "[E*h, 2F] or [h, E*2F]" if fc == 1 else "[E*F, h]"
        raise ShapeError(f"grouped expert tensor {info.name} has shape {list(info.shape)}, which is not "
                         f"{what} for E={experts} experts and hidden {hidden} (from mlp.router.weight).")
    other = per // hidden
    item = info.nbytes // numel
    # stored block: [h, 2F] (fc1) or [F, h] (fc2); the Megatron tensor is its transpose
    shape = (other, hidden) if fc == 1 else (hidden, other)
    return [replace(info, shape=shape, offset=info.offset + x * per * item, nbytes=per * item, block=(x, experts))
            for x in range(experts)]


def per_expert_recipes(recipes: tuple[Recipe, ...], present: set[str]) -> list[Recipe]:
    """The recipes, those with `{expert}` (per-expert source names) once per expert number present."""
    out: list[Recipe] = []
    for r in recipes:
        if "{expert}" not in r.target:
            out.append(r)
            continue
        pattern = re.compile(re.escape(r.sources[0]).replace(re.escape("{expert}"), r"(\d+)") + "$")
        numbers = sorted({int(m.group(1)) for t in present if (m := pattern.match(t))})
        out += [Recipe(r.target.replace("{expert}", str(n)), r.op, tuple(s.replace("{expert}", str(n))
                                                                        for s in r.sources)) for n in numbers]
    return out


def expand_experts(logical: dict[Key, Logical], make: type[Logical]) -> None:
    """Replace every layer's grouped weight1/weight2 by per-expert logical tensors (in place).

    `make` is the `Logical` class (passed in to keep this module below `resolve`)."""
    for (target, layer), lg in sorted(((k, v) for k, v in logical.items() if k[0] in (GROUPED_FC1, GROUPED_FC2)),
                                      key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        router = logical.get((ROUTER, layer))
        if router is None:
            raise MissingKeyError(f"{fill(target, layer)} has no {fill(ROUTER, layer)} beside it: the number of "
                                  "experts cannot be known. The checkpoint is incomplete.")
        experts, hidden = router.inputs[0].shape
        fc = 1 if target == GROUPED_FC1 else 2
        source = lg.recipe.sources[0]
        for x, info in enumerate(_blocks(lg.inputs[0], experts, hidden, fc)):
            name = expert_name(x, fc)
            logical[(name, layer)] = make(name, layer, Recipe(name, Copy, (source,)), (info,))
        del logical[(target, layer)]
