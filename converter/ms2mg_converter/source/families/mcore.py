"""MindFormers mcore names (`mindformers.parallel_core`, r1.6+): Megatron-core's own names.

With `normalization: LayerNorm`, MindFormers' parallel_core norm.py LayerNorm / FusedLayerNorm name their
parameters `gamma` and `beta` (RMSNorm uses `weight`), so every norm may come as `<norm>.gamma/.beta`.
RoPE: the mcore TransformerConfig's rotary_percent (1.0) and rotary_interleaved (False) defaults, which a
YAML that changes them states (`--config`). MoE layers: `families/moe.py`.
"""

from __future__ import annotations

from ms2mg_converter.layout import Copy, GluFused, QkvFused
from ms2mg_converter.names import EMBED, FC1, FC2, FINAL, OUTPUT, POS, PROJ, QKV, L
from ms2mg_converter.source.families.base import Family, Recipe, same
from ms2mg_converter.source.families.mla import MLA_RECIPES
from ms2mg_converter.source.families.moe import MOE_RECIPES
from ms2mg_converter.source.families.registry import register

_NORMS = (f"{L}input_layernorm", f"{L}pre_mlp_layernorm", f"{L}self_attention.q_layernorm",
          f"{L}self_attention.k_layernorm", FINAL)


def _norms() -> tuple[Recipe, ...]:
    recipes: list[Recipe] = []
    for norm in _NORMS:
        for megatron, mindspore in (("weight", "gamma"), ("bias", "beta")):
            recipes.append(Recipe(f"{norm}.{megatron}", Copy, (f"{norm}.{megatron}",)))
            recipes.append(Recipe(f"{norm}.{megatron}", Copy, (f"{norm}.{mindspore}",)))
    return tuple(recipes)


MCORE = register(Family(
    name="mcore",
    description="MindFormers mcore (mindformers.parallel_core) names: identical to Megatron-core names "
                "(LayerNorm parameters also as gamma/beta)",
    recipes=(
        *same(EMBED, POS, OUTPUT),
        *_norms(),
        *same(f"{PROJ}.weight", f"{PROJ}.bias", f"{FC2}.weight", f"{FC2}.bias"),
        *same(f"{QKV}.weight", f"{QKV}.bias", op=QkvFused),
        *same(f"{FC1}.weight", f"{FC1}.bias", op=GluFused),
        *MOE_RECIPES,
        *MLA_RECIPES,
    ),
    facts={"rotary_percent": 1.0, "rotary_interleaved": False},
))
