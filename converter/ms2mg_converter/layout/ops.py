"""Named, reversible layout operations: how the source tensor(s) of a family become one Megatron tensor.

A mapping table (`source.families`) names an operation class per Megatron tensor; the planner binds it to
the model's sizes (`bind`) and gets an object with three faces, written independently of each other:

* `runs()`: the row map the converter executes (`rows.Run`; pure Python, so planning needs no torch);
* `apply(inputs)`: the same transform stated with torch the way Megatron's tools do (view, split, cat),
  used by `ms2mg verify` to rebuild the expected tensor;
* `invert(full)`: the inverse, with torch: `invert(apply(x)) == x` bit for bit (round-trip tests).

`tests/converter/test_ops.py` checks that `runs` and `apply` agree and that every `invert` restores its
inputs. Adding an operation = one subclass here (plus its test); nothing dispatches on operation kinds.
Torch is imported inside `apply`/`invert` only, so this module stays importable without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from ms2mg_converter.config import Fc1Layout, PadFill, QkvLayout
from ms2mg_converter.layout.rows import Run, concat, identity

if TYPE_CHECKING:
    from torch import Tensor

Shape = tuple[int, ...]


class Dims(Protocol):
    """The model sizes an operation is bound to (`model.arch.Architecture` has them all)."""

    @property
    def num_attention_heads(self) -> int: ...
    @property
    def num_query_groups(self) -> int: ...
    @property
    def kv_channels(self) -> int: ...
    @property
    def ffn_hidden_size(self) -> int: ...
    @property
    def swiglu(self) -> bool: ...
    @property
    def qkv_layout(self) -> QkvLayout | None: ...
    @property
    def fc1_layout(self) -> Fc1Layout | None: ...


class LayoutOp(ABC):
    """One named transform: source tensor(s) -> one Megatron tensor (TP1 layout), as rows."""

    name: ClassVar[str]
    rebuild_whole: ClassVar[bool] = True
    """Verification rebuilds the whole tensor with `apply` (a reordering); False: compared in row blocks."""
    layout_flag: ClassVar[str | None] = None
    """'qkv' / 'fc1': the source row order matters and must be stated (`--qkv-layout` / `--fc1-layout`)."""

    @classmethod
    @abstractmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> LayoutOp:
        """This operation for a model of these sizes whose inputs have these shapes."""

    @classmethod
    def logical_shape(cls, shapes: Sequence[Shape]) -> Shape:
        """Shape of the Megatron tensor built from inputs of these shapes (before any vocabulary resize)."""
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    @classmethod
    def layout_matters(cls, dims: Dims) -> bool:
        """Whether the row order of the input must be known for a model of these sizes."""
        return False

    @classmethod
    def input_rows(cls, dims: Dims) -> tuple[int, ...] | None:
        """The rows each input must have for a model of these sizes (None: no rule of this operation's own)."""
        return None

    @classmethod
    def infer_head_dim(cls, shapes: Sequence[Shape], heads: int) -> int | None:
        """The head dimension, where the input shapes tell it without assumption."""
        return None

    @classmethod
    def infer_groups(cls, shapes: Sequence[Shape], head_dim: int) -> int | None:
        """The number of query groups, where the input shapes tell it without assumption."""
        return None

    @abstractmethod
    def runs(self) -> list[Run]:
        """Target rows from input rows."""

    @abstractmethod
    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        """The Megatron tensor from the inputs, with torch (into `out` when given and when a copy is made)."""

    @abstractmethod
    def invert(self, full: Tensor) -> list[Tensor]:
        """The inputs back from the Megatron tensor, with torch."""


def _cat(parts: Sequence[Tensor], out: Tensor | None) -> Tensor:
    import torch

    if out is None:
        return torch.cat(list(parts), dim=0)
    return torch.cat(list(parts), dim=0, out=out)


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


def _grouped_runs(heads: int, groups: int, d: int, starts: tuple[int, int, int],
                  srcs: tuple[int, int, int]) -> list[Run]:
    """Megatron's grouped QKV: per query group its Q heads, then its K head, then its V head."""
    q_per = heads // groups
    runs: list[Run] = []
    for g in range(groups):
        base = g * (q_per + 2) * d
        runs.append(Run(base, q_per * d, srcs[0], starts[0] + g * q_per * d))
        runs.append(Run(base + q_per * d, d, srcs[1], starts[1] + g * d))
        runs.append(Run(base + (q_per + 1) * d, d, srcs[2], starts[2] + g * d))
    return runs


def _to_grouped(q: Tensor, k: Tensor, v: Tensor, groups: int, out: Tensor | None) -> Tensor:
    import torch

    tail = q.shape[1:]
    parts = (q.reshape(groups, -1, *tail), k.reshape(groups, -1, *tail), v.reshape(groups, -1, *tail))
    if out is None:
        return torch.cat(parts, dim=1).reshape(-1, *tail)
    torch.cat(parts, dim=1, out=out.view(groups, -1, *tail))
    return out


def _from_grouped(x: Tensor, heads: int, groups: int, d: int) -> list[Tensor]:
    import torch

    per = heads // groups * d
    parts = torch.split(x.reshape(groups, per + 2 * d, *x.shape[1:]), [per, d, d], dim=1)
    return [p.reshape(-1, *x.shape[1:]) for p in parts]


@dataclass(frozen=True)
class QkvSplit(LayoutOp):
    """Separate q [heads*d], k [groups*d], v [groups*d] -> Megatron's grouped QKV."""

    heads: int
    groups: int
    head_dim: int
    name: ClassVar[str] = "qkv_split"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> QkvSplit:
        return cls(dims.num_attention_heads, dims.num_query_groups, dims.kv_channels)

    @classmethod
    def input_rows(cls, dims: Dims) -> tuple[int, ...]:
        d = dims.kv_channels
        return dims.num_attention_heads * d, dims.num_query_groups * d, dims.num_query_groups * d

    @classmethod
    def infer_head_dim(cls, shapes: Sequence[Shape], heads: int) -> int:
        return shapes[0][0] // heads

    @classmethod
    def infer_groups(cls, shapes: Sequence[Shape], head_dim: int) -> int:
        return shapes[1][0] // head_dim

    def runs(self) -> list[Run]:
        return _grouped_runs(self.heads, self.groups, self.head_dim, (0, 0, 0), (0, 1, 2))

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        return _to_grouped(inputs[0], inputs[1], inputs[2], self.groups, out)

    def invert(self, full: Tensor) -> list[Tensor]:
        return _from_grouped(full, self.heads, self.groups, self.head_dim)


@dataclass(frozen=True)
class QkvFused(LayoutOp):
    """One fused q/k/v tensor in the source's layout -> Megatron's grouped QKV.

    `grouped` is Megatron's own order (nothing moves); `contiguous` is [all Q; all K; all V]."""

    heads: int
    groups: int
    head_dim: int
    layout: QkvLayout
    name: ClassVar[str] = "qkv_fused"
    layout_flag: ClassVar[str | None] = "qkv"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> QkvFused:
        return cls(dims.num_attention_heads, dims.num_query_groups, dims.kv_channels,
                   dims.qkv_layout or QkvLayout.GROUPED)

    @classmethod
    def layout_matters(cls, dims: Dims) -> bool:
        return dims.num_query_groups > 1

    @classmethod
    def input_rows(cls, dims: Dims) -> tuple[int, ...]:
        return ((dims.num_attention_heads + 2 * dims.num_query_groups) * dims.kv_channels,)

    def _sizes(self) -> list[int]:
        return [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim]

    def runs(self) -> list[Run]:
        if self.layout is QkvLayout.GROUPED:
            return identity((self.heads + 2 * self.groups) * self.head_dim)
        q, k, _ = self._sizes()
        return _grouped_runs(self.heads, self.groups, self.head_dim, (0, q, q + k), (0, 0, 0))

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        import torch

        if self.layout is QkvLayout.GROUPED:
            return inputs[0]
        q, k, v = torch.split(inputs[0], self._sizes(), dim=0)
        return _to_grouped(q, k, v, self.groups, out)

    def invert(self, full: Tensor) -> list[Tensor]:
        if self.layout is QkvLayout.GROUPED:
            return [full]
        return [_cat(_from_grouped(full, self.heads, self.groups, self.head_dim), None)]


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
        return _cat(inputs, out)

    def invert(self, full: Tensor) -> list[Tensor]:
        return list(full.chunk(2, dim=0))


@dataclass(frozen=True)
class GluFused(LayoutOp):
    """One fused SwiGLU fc1 [2f] in the source's layout -> Megatron's [gate; up].

    `gate-up` is Megatron's own order; `interleaved` alternates rows gate, up, gate, up. Without SwiGLU
    the tensor is a plain fc1 and `bind` gives a `Copy`."""

    ffn: int
    layout: Fc1Layout
    name: ClassVar[str] = "glu_fused"
    layout_flag: ClassVar[str | None] = "fc1"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> LayoutOp:
        if not dims.swiglu:
            return Copy.bind(dims, shapes)
        return cls(dims.ffn_hidden_size, dims.fc1_layout or Fc1Layout.GATE_UP)

    @classmethod
    def layout_matters(cls, dims: Dims) -> bool:
        return dims.swiglu

    def runs(self) -> list[Run]:
        if self.layout is Fc1Layout.GATE_UP:
            return identity(2 * self.ffn)
        return [Run(0, self.ffn, 0, 0, 2), Run(self.ffn, self.ffn, 0, 1, 2)]

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        x = inputs[0]
        if self.layout is Fc1Layout.GATE_UP:
            return x
        return _cat((x[0::2], x[1::2]), out)

    def invert(self, full: Tensor) -> list[Tensor]:
        import torch

        if self.layout is Fc1Layout.GATE_UP:
            return [full]
        gate, up = torch.chunk(full, 2, dim=0)
        return [torch.stack((gate, up), dim=1).reshape(full.shape)]


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
        return _cat((x[: self.kept], fill), out)

    def invert(self, full: Tensor) -> list[Tensor]:
        return [full[: self.kept]]
