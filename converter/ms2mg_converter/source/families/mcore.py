"""MindFormers mcore names (`mindformers.parallel_core`): identical to Megatron-core's names."""

from __future__ import annotations

from ms2mg_converter.layout import GluFused, QkvFused
from ms2mg_converter.names import EMBED, FC1, FC2, FINAL, OUTPUT, POS, PROJ, QKV, L
from ms2mg_converter.source.families.base import Family, same
from ms2mg_converter.source.families.registry import register

_NORMS = ("input_layernorm", "pre_mlp_layernorm", "self_attention.q_layernorm", "self_attention.k_layernorm")

MCORE = register(Family(
    name="mcore",
    description="MindFormers mcore (mindformers.parallel_core) names: identical to Megatron-core names",
    recipes=(
        *same(EMBED, POS, f"{FINAL}.weight", f"{FINAL}.bias", OUTPUT),
        *same(*(f"{L}{n}.{p}" for n in _NORMS for p in ("weight", "bias"))),
        *same(f"{PROJ}.weight", f"{PROJ}.bias", f"{FC2}.weight", f"{FC2}.bias"),
        *same(f"{QKV}.weight", f"{QKV}.bias", op=QkvFused),
        *same(f"{FC1}.weight", f"{FC1}.bias", op=GluFused),
    ),
))
