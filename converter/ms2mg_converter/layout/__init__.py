"""Layout: the named, reversible tensor operations and Megatron's tensor-parallel split rules.

The lowest stage above the contract modules (`config`, `errors`): the family tables name these operations,
the planner executes their row maps, verification re-states them with torch. Pure Python at import time.

Public names: `Run`, `LayoutOp` and its operations (`Copy`, `QkvSplit`, `QkvFused`, `GluSplit`,
`GluFused`, `VocabResize`), `Split`.
"""

from ms2mg_converter.layout.ops import Copy, Dims, GluFused, GluSplit, LayoutOp, QkvFused, QkvSplit, VocabResize
from ms2mg_converter.layout.rows import Run, concat, covered, identity, select
from ms2mg_converter.layout.tp import Split, glu_parts

__all__ = ["Copy", "Dims", "GluFused", "GluSplit", "LayoutOp", "QkvFused", "QkvSplit", "Run", "Split",
           "VocabResize", "concat", "covered", "glu_parts", "identity", "select"]
