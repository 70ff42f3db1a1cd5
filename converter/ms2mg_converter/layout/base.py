"""Named, reversible layout operations: the interface (the operations are in copy.py, qkv.py, glu.py).

How the source tensor(s) of a family become one Megatron tensor.

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
from typing import TYPE_CHECKING, ClassVar, Protocol

from ms2mg_converter.config import Fc1Layout, QkvLayout
from ms2mg_converter.layout.rows import Run

if TYPE_CHECKING:
    from torch import Tensor

Shape = tuple[int, ...]


class Dims(Protocol):
    """The model sizes an operation is bound to (`model.arch.Architecture` has them all)."""

    @property
    def hidden_size(self) -> int: ...
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
    @property
    def source_tensor_parallel(self) -> int: ...


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


def cat(parts: Sequence[Tensor], out: Tensor | None) -> Tensor:
    """torch.cat along rows, into `out` when given."""
    import torch

    if out is None:
        return torch.cat(list(parts), dim=0)
    return torch.cat(list(parts), dim=0, out=out)
