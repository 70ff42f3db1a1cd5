"""Multi-latent attention (MLA): MindFormers' fused down projection -> Megatron's two down projections.

MindFormers' default MLA variant (`mla_qkv_concat: True`, multi_latent_attention.py at master f52743ca)
computes the query and the key/value compressions with one linear, `self_attention.linear_qkv` of
`[q_rows + kv_lora_rank + qk_pos_emb_head_dim, hidden]`, and splits its output as
`split(qkv, [q_lora_rank, kv_lora_rank, qk_pos_emb_head_dim])`. So its rows are
`[linear_q_down_proj ; linear_kv_down_proj]` (with `q_lora_rank` None: `[linear_q_proj ; linear_kv_down_proj]`,
`q_rows = heads x (qk_head_dim + qk_pos_emb_head_dim)`). Inside each part the rows are already in Megatron's
order (q per head `[nope ; rope]`, kv_down `[compressed ; k_pe]`; both frameworks de-interleave the RoPE
dimensions at run time), so the split is all there is (mindformers-moe-mla-distributed.md §2.1).

Two operations, one per target: `MlaFusedQ` (the first `q_rows` rows) and `MlaFusedKv` (the rest). Each
`invert` gives back the rows it took; the fused source is `fuse_qkv(q_part, kv_part)` (their concatenation),
which the round-trip tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from ms2mg_converter.layout.base import Dims, LayoutOp, Shape, cat
from ms2mg_converter.layout.rows import Run

if TYPE_CHECKING:
    from torch import Tensor


class MlaRows(Protocol):
    """What the split needs from the model's MLA sizes (`model.mla.MlaDims` has them)."""

    @property
    def q_rows(self) -> int: ...
    @property
    def kv_down_rows(self) -> int: ...


def _mla(dims: Dims) -> MlaRows:
    mla: MlaRows | None = getattr(dims, "mla", None)
    if mla is None:
        raise TypeError("an MLA operation was bound to a model without multi-latent attention sizes")
    return mla


@dataclass(frozen=True)
class MlaFusedQ(LayoutOp):
    """Rows [0, q_rows) of MindFormers' fused MLA `linear_qkv`: linear_q_down_proj (or linear_q_proj)."""

    q_rows: int
    total_rows: int
    name: ClassVar[str] = "mla_fused_q"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> MlaFusedQ:
        return cls(_mla(dims).q_rows, shapes[0][0])

    def runs(self) -> list[Run]:
        return [Run(0, self.q_rows, 0, 0)]

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        return cat([inputs[0].narrow(0, 0, self.q_rows)], out)

    def invert(self, full: Tensor) -> list[Tensor]:
        return [full]


@dataclass(frozen=True)
class MlaFusedKv(LayoutOp):
    """Rows [q_rows, end) of MindFormers' fused MLA `linear_qkv`: linear_kv_down_proj."""

    q_rows: int
    total_rows: int
    name: ClassVar[str] = "mla_fused_kv"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> MlaFusedKv:
        return cls(_mla(dims).q_rows, shapes[0][0])

    def runs(self) -> list[Run]:
        return [Run(0, self.total_rows - self.q_rows, 0, self.q_rows)]

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        return cat([inputs[0].narrow(0, self.q_rows, self.total_rows - self.q_rows)], out)

    def invert(self, full: Tensor) -> list[Tensor]:
        return [full]


def fuse_qkv(q_part: Tensor, kv_part: Tensor) -> Tensor:
    """The inverse of the pair: MindFormers' fused `linear_qkv` from the two Megatron down projections."""
    import torch

    return torch.cat([q_part, kv_part], dim=0)
