"""Operations of MoE layers: the shared experts' fused SwiGLU fc1 (sized by the shared-expert width).

Routed experts need no operation of their own: each is a transposed block of MindFormers' grouped tensor
(`source.experts`) copied as it is (`Copy`); the transposition is done by the executor's read of the block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ms2mg_converter.layout.base import Dims, LayoutOp, Shape
from ms2mg_converter.layout.glu import GluFused


@dataclass(frozen=True)
class SharedGluFused(GluFused):
    """`mlp.shared_experts.linear_fc1` [2Fs] in the source's fc1 layout -> [gate; up] (as dense fc1, with the
    shared-expert width Fs; MindFormers' `use_interleaved_weight_layout_mlp` applies to both, §1.1)."""

    name: ClassVar[str] = "shared_glu_fused"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> LayoutOp:
        op = GluFused.bind(dims, shapes)
        if not isinstance(op, GluFused):
            return op
        return cls(shapes[0][0] // 2, op.layout, op.source_tp)
