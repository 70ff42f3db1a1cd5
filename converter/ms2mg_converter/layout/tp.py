"""Megatron's tensor-parallel split rules, in one place: which rows/columns of a TP1 tensor rank r holds.

Every Megatron tensor has one split kind (the table that says which is `plan.target.SPLITS`). Each kind
states its rule twice, independently: as row/column ranges for the planner (pure Python) and with torch
(`shards` / `merge`, as Megatron's tools chunk and concatenate) for verification and round-trip tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


class Split(StrEnum):
    VOCAB = "vocab"
    """Rows split in TP contiguous chunks after vocabulary padding (embedding, output layer)."""
    COLUMN = "column"
    """Rows (output features) split in TP contiguous chunks; for linear_qkv that is whole query groups."""
    GLU = "glu"
    """SwiGLU fc1: rank r gets [gate_r; up_r], each half split like COLUMN. Without SwiGLU: COLUMN."""
    ROW = "row"
    """Columns (input features) split in TP contiguous chunks."""
    REPLICATED = "replicated"

    def row_ranges(self, rows: int, tp: int, rank: int, swiglu: bool) -> list[tuple[int, int]]:
        """The TP1 rows [a, b) that rank `rank` holds, in the order it holds them."""
        if self is Split.GLU and swiglu:
            half = rows // 2
            per = half // tp
            return [(rank * per, (rank + 1) * per), (half + rank * per, half + (rank + 1) * per)]
        if self in (Split.VOCAB, Split.COLUMN, Split.GLU):
            per = rows // tp
            return [(rank * per, (rank + 1) * per)]
        return [(0, rows)]

    def col_range(self, cols: int, tp: int, rank: int) -> tuple[int, int] | None:
        """The TP1 columns [a, b) that rank `rank` holds (None: all of them)."""
        if self is not Split.ROW:
            return None
        per = cols // tp
        return rank * per, (rank + 1) * per

    def shards(self, full: Tensor, tp: int, swiglu: bool) -> list[Tensor]:
        """Every rank's shard of `full`, with torch (Megatron's chunk rules)."""
        import torch

        if self is Split.GLU and swiglu:
            return [torch.cat(glu_parts(full, tp, r), dim=0) for r in range(tp)]
        if self in (Split.VOCAB, Split.COLUMN, Split.GLU):
            return list(torch.chunk(full, tp, dim=0))
        if self is Split.ROW:
            return list(torch.chunk(full, tp, dim=1))
        return [full] * tp

    def merge(self, shards: Sequence[Tensor], swiglu: bool) -> Tensor:
        """The inverse of `shards` (replicated shards must all be equal)."""
        import torch

        if self is Split.GLU and swiglu:
            halves = [torch.chunk(s, 2, dim=0) for s in shards]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        if self in (Split.VOCAB, Split.COLUMN, Split.GLU):
            return torch.cat(list(shards), dim=0)
        if self is Split.ROW:
            return torch.cat(list(shards), dim=1)
        if not all(torch.equal(s, shards[0]) for s in shards[1:]):
            raise ValueError("replicated shards differ between tensor-parallel ranks")
        return shards[0]


def glu_parts(full: Tensor, tp: int, rank: int) -> tuple[Tensor, Tensor]:
    """Rank `rank`'s SwiGLU fc1 shard is [gate_r; up_r]: the two halves, as views of `full`."""
    import torch

    gate, up = torch.chunk(full, 2, dim=0)
    return torch.chunk(gate, tp)[rank], torch.chunk(up, tp)[rank]
