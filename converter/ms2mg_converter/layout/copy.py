"""Operations that move no rows between tensors: the tensor as it is, the vocabulary resize, zeros."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ms2mg_converter.config import PadFill
from ms2mg_converter.layout.base import Dims, LayoutOp, Shape, cat
from ms2mg_converter.layout.rows import Run, identity

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Copy(LayoutOp):
    """The tensor as it is."""

    rows: int
    name: ClassVar[str] = "copy"
    rebuild_whole: ClassVar[bool] = False

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> Copy:
        return cls(shapes[0][0])

    def runs(self) -> list[Run]:
        return identity(self.rows)

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        return inputs[0]

    def invert(self, full: Tensor) -> list[Tensor]:
        return [full]


@dataclass(frozen=True)
class VocabResize(LayoutOp):
    """An embedding-like table resized to Megatron's padded vocabulary (bound by the planner, not a table).

    `last-row` is Megatron's saver `pad_weight`, bit for bit: rows [0, min(source, padded)) are copied and,
    when the table grows, the new rows repeat the source's last row. `zero`: rows [0, true) are copied and
    every row past the true vocabulary is zero. `invert` gives back the rows that were kept."""

    source_rows: int
    true_rows: int
    padded_rows: int
    fill: PadFill
    name: ClassVar[str] = "vocab"
    rebuild_whole: ClassVar[bool] = False

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> VocabResize:
        raise TypeError("VocabResize is bound by the planner with the vocabulary sizes (VocabResize(...)).")

    @property
    def kept(self) -> int:
        return self.true_rows if self.fill is PadFill.ZERO else min(self.source_rows, self.padded_rows)

    def runs(self) -> list[Run]:
        runs = [Run(0, self.kept, 0, 0)]
        extra = self.padded_rows - self.kept
        if extra > 0 and self.fill is PadFill.ZERO:
            runs.append(Run(self.kept, extra, None, 0))
        elif extra > 0:
            runs.append(Run(self.kept, extra, 0, self.source_rows - 1, 0))
        return runs

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        import torch

        x = inputs[0]
        extra = self.padded_rows - self.kept
        if self.fill is PadFill.ZERO:
            fill = torch.zeros((extra, *x.shape[1:]), dtype=x.dtype)
        else:
            fill = x[-1:].expand(extra, *x.shape[1:])
        return cat((x[: self.kept], fill), out)

    def invert(self, full: Tensor) -> list[Tensor]:
        return [full[: self.kept]]


@dataclass(frozen=True)
class Zeros(LayoutOp):
    """A tensor the source does not have and Megatron needs, all zeros: a bias Megatron cannot leave out
    when the family has biases on some linear layers only (e.g. TeleChat2: on linear_proj and fc2). A zero
    bias computes exactly what no bias computes. Subclasses say how many rows."""

    rows: int
    name: ClassVar[str] = "zeros"

    @classmethod
    def rows_for(cls, dims: Dims) -> int:
        raise NotImplementedError

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> Zeros:
        return cls(cls.rows_for(dims))

    def runs(self) -> list[Run]:
        return [Run(0, self.rows, None, 0)]

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        import torch

        return torch.zeros(self.rows) if out is None else out.zero_()

    def invert(self, full: Tensor) -> list[Tensor]:
        return []


class QkvBiasZeros(Zeros):
    """Zero linear_qkv bias: (heads + 2 groups) x head_dim rows."""

    @classmethod
    def rows_for(cls, dims: Dims) -> int:
        return (dims.num_attention_heads + 2 * dims.num_query_groups) * dims.kv_channels


class Fc1BiasZeros(Zeros):
    """Zero linear_fc1 bias: 2 x ffn rows with SwiGLU, ffn rows without."""

    @classmethod
    def rows_for(cls, dims: Dims) -> int:
        return (2 if dims.swiglu else 1) * dims.ffn_hidden_size


class HiddenBiasZeros(Zeros):
    """Zero bias of a layer whose output is the hidden state (linear_proj, linear_fc2): hidden rows."""

    @classmethod
    def rows_for(cls, dims: Dims) -> int:
        return dims.hidden_size
