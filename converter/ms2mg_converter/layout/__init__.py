"""Layout: the named, reversible tensor operations and Megatron's tensor-parallel split rules.

The lowest stage above the contract modules (`config`, `errors`): the family tables name these operations,
the planner executes their row maps, verification re-states them with torch. Pure Python at import time.

* `rows`: the row-map primitive (`Run`) every operation is executed with;
* `base`: the `LayoutOp` interface (`runs` / `apply` / `invert`, and what architecture inference asks);
* `copy`, `qkv`, `glu`, `mla`: the operations;
* `tp`: Megatron's tensor-parallel split rules (`Split`).
"""

from ms2mg_converter.layout.base import Dims, LayoutOp
from ms2mg_converter.layout.copy import Copy, Fc1BiasZeros, HiddenBiasZeros, QkvBiasZeros, VocabResize, Zeros
from ms2mg_converter.layout.glu import GluFused, GluSplit
from ms2mg_converter.layout.mla import MlaFusedKv, MlaFusedQ, fuse_qkv
from ms2mg_converter.layout.qkv import QkvFromQAndKv, QkvFused, QkvSplit
from ms2mg_converter.layout.rows import Run, concat, covered, identity, select
from ms2mg_converter.layout.tp import Split, glu_parts

__all__ = [
           "Copy",
           "Dims",
           "Fc1BiasZeros",
           "GluFused",
           "GluSplit",
           "HiddenBiasZeros",
           "LayoutOp",
           "MlaFusedKv",
           "MlaFusedQ",
           "QkvBiasZeros",
           "QkvFromQAndKv",
           "QkvFused",
           "QkvSplit",
           "Run",
           "Split",
           "VocabResize",
           "Zeros",
           "concat",
           "covered",
           "fuse_qkv",
           "glu_parts",
           "identity",
           "select",
]
