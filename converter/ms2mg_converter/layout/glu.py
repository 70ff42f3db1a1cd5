"""SwiGLU fc1: separate or fused gate/up in a source's layout -> Megatron's [gate; up]."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ms2mg_converter.config import Fc1Layout
from ms2mg_converter.layout.base import Dims, LayoutOp, Shape, cat
from ms2mg_converter.layout.copy import Copy
from ms2mg_converter.layout.rows import Run, concat, identity

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class GluSplit(LayoutOp):
    """Separate gate [f] and up [f] -> Megatron's fc1 [gate; up]."""

    ffn: int
    name: ClassVar[str] = "glu_split"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> GluSplit:
        return cls(dims.ffn_hidden_size)

    def runs(self) -> list[Run]:
        return concat(identity(self.ffn, 0), identity(self.ffn, 1))

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        return cat(inputs, out)

    def invert(self, full: Tensor) -> list[Tensor]:
        return list(full.chunk(2, dim=0))


@dataclass(frozen=True)
class GluFused(LayoutOp):
    """One fused SwiGLU fc1 [2f] in the source's layout -> Megatron's [gate; up].

    `gate-up` is [gate; up] per source tensor-parallel rank ([G_0;U_0; G_1;U_1; ...] for a checkpoint trained
    at TP t, as MindFormers splits each rank's own slice; t = 1 is Megatron's own order); `interleaved`
    alternates rows gate, up, gate, up (the same at any TP). Without SwiGLU the tensor is a plain fc1 and
    `bind` gives a `Copy`."""

    ffn: int
    layout: Fc1Layout
    source_tp: int = 1
    name: ClassVar[str] = "glu_fused"
    layout_flag: ClassVar[str | None] = "fc1"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> LayoutOp:
        if not dims.swiglu:
            return Copy.bind(dims, shapes)
        return cls(dims.ffn_hidden_size, dims.fc1_layout or Fc1Layout.GATE_UP, dims.source_tensor_parallel)

    @classmethod
    def layout_matters(cls, dims: Dims) -> bool:
        return dims.swiglu

    def runs(self) -> list[Run]:
        f = self.ffn
        if self.layout is Fc1Layout.INTERLEAVED:
            return [Run(0, f, 0, 0, 2), Run(f, f, 0, 1, 2)]
        if self.source_tp == 1:
            return identity(2 * f)
        per = f // self.source_tp
        gates = [Run(r * per, per, 0, 2 * r * per) for r in range(self.source_tp)]
        ups = [Run(f + r * per, per, 0, 2 * r * per + per) for r in range(self.source_tp)]
        return gates + ups

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        import torch

        x = inputs[0]
        if self.layout is Fc1Layout.INTERLEAVED:
            return cat((x[0::2], x[1::2]), out)
        if self.source_tp == 1:
            return x
        halves = [torch.chunk(block, 2, dim=0) for block in torch.chunk(x, self.source_tp, dim=0)]
        return cat([h[0] for h in halves] + [h[1] for h in halves], out)

    def invert(self, full: Tensor) -> list[Tensor]:
        import torch

        if self.layout is Fc1Layout.INTERLEAVED:
            gate, up = torch.chunk(full, 2, dim=0)
            return [torch.stack((gate, up), dim=1).reshape(full.shape)]
        if self.source_tp == 1:
            return [full]
        gates, ups = (torch.chunk(h, self.source_tp, dim=0) for h in torch.chunk(full, 2, dim=0))
        return [cat([p for r in range(self.source_tp) for p in (gates[r], ups[r])], None)]
