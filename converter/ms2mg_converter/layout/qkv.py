"""Attention projections: separate or fused q/k/v in a source's layout -> Megatron's grouped QKV."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ms2mg_converter.config import QkvLayout
from ms2mg_converter.layout.base import Dims, LayoutOp, Shape, cat
from ms2mg_converter.layout.rows import Run, identity

if TYPE_CHECKING:
    from torch import Tensor


def _grouped_runs(heads: int, groups: int, d: int, starts: tuple[int, int, int],
                  srcs: tuple[int, int, int], kv_stride: int | None = None) -> list[Run]:
    """Megatron's grouped QKV: per query group its Q heads, then its K head, then its V head.

    Group g's q rows start at `starts[0] + g * q_per * d` of input `srcs[0]`, its k rows at
    `starts[1] + g * kv_stride` and its v rows at `starts[2] + g * kv_stride` (`kv_stride` d by default)."""
    q_per = heads // groups
    stride = d if kv_stride is None else kv_stride
    runs: list[Run] = []
    for g in range(groups):
        base = g * (q_per + 2) * d
        runs.append(Run(base, q_per * d, srcs[0], starts[0] + g * q_per * d))
        runs.append(Run(base + q_per * d, d, srcs[1], starts[1] + g * stride))
        runs.append(Run(base + (q_per + 1) * d, d, srcs[2], starts[2] + g * stride))
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

    `grouped` is Megatron's own order (nothing moves). `contiguous` is [Q; K; V] per source tensor-parallel
    rank: MindFormers' contiguous split runs on each training rank's own slice, so a checkpoint trained at
    TP t holds [Q_0;K_0;V_0; Q_1;K_1;V_1; ...] (t = 1: [all Q; all K; all V]). Rank r's block holds query
    groups [r*g/t, (r+1)*g/t), which are exactly Megatron's rows of the same block, so each block is
    regrouped on its own."""

    heads: int
    groups: int
    head_dim: int
    layout: QkvLayout
    source_tp: int = 1
    name: ClassVar[str] = "qkv_fused"
    layout_flag: ClassVar[str | None] = "qkv"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> QkvFused:
        return cls(dims.num_attention_heads, dims.num_query_groups, dims.kv_channels,
                   dims.qkv_layout or QkvLayout.GROUPED, dims.source_tensor_parallel)

    @classmethod
    def layout_matters(cls, dims: Dims) -> bool:
        return dims.num_query_groups > 1

    @classmethod
    def input_rows(cls, dims: Dims) -> tuple[int, ...]:
        return ((dims.num_attention_heads + 2 * dims.num_query_groups) * dims.kv_channels,)

    @property
    def _block(self) -> tuple[int, int, int]:
        """Heads, groups and rows of one source rank's block."""
        t = self.source_tp
        return self.heads // t, self.groups // t, (self.heads + 2 * self.groups) * self.head_dim // t

    def runs(self) -> list[Run]:
        if self.layout is QkvLayout.GROUPED:
            return identity((self.heads + 2 * self.groups) * self.head_dim)
        nh, ng, rows = self._block
        d = self.head_dim
        local = _grouped_runs(nh, ng, d, (0, nh * d, (nh + ng) * d), (0, 0, 0))
        return [Run(x.dst + r * rows, x.count, 0, x.start + r * rows) for r in range(self.source_tp) for x in local]

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        import torch

        if self.layout is QkvLayout.GROUPED:
            return inputs[0]
        nh, ng, _ = self._block
        d = self.head_dim
        blocks = []
        for block in torch.chunk(inputs[0], self.source_tp, dim=0):
            q, k, v = torch.split(block, [nh * d, ng * d, ng * d], dim=0)
            blocks.append(_to_grouped(q, k, v, ng, None))
        return cat(blocks, out)

    def invert(self, full: Tensor) -> list[Tensor]:
        import torch

        if self.layout is QkvLayout.GROUPED:
            return [full]
        nh, ng, _ = self._block
        blocks = [cat(_from_grouped(b, nh, ng, self.head_dim), None) for b in torch.chunk(full, self.source_tp)]
        return [cat(blocks, None)]


@dataclass(frozen=True)
class QkvFromQAndKv(LayoutOp):
    """Separate q [heads*d] and a fused kv [groups*2d] holding per KV head [k_h; v_h] (TeleChat2's `wk_v`)
    -> Megatron's grouped QKV. The per-head order does not depend on the training TP size."""

    heads: int
    groups: int
    head_dim: int
    name: ClassVar[str] = "qkv_q_and_kv"

    @classmethod
    def bind(cls, dims: Dims, shapes: Sequence[Shape]) -> QkvFromQAndKv:
        return cls(dims.num_attention_heads, dims.num_query_groups, dims.kv_channels)

    @classmethod
    def input_rows(cls, dims: Dims) -> tuple[int, ...]:
        d = dims.kv_channels
        return dims.num_attention_heads * d, 2 * dims.num_query_groups * d

    @classmethod
    def infer_head_dim(cls, shapes: Sequence[Shape], heads: int) -> int:
        return shapes[0][0] // heads

    @classmethod
    def infer_groups(cls, shapes: Sequence[Shape], head_dim: int) -> int:
        return shapes[1][0] // (2 * head_dim)

    def runs(self) -> list[Run]:
        d = self.head_dim
        return _grouped_runs(self.heads, self.groups, d, (0, 0, d), (0, 1, 1), kv_stride=2 * d)

    def apply(self, inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        q, kv = inputs
        tail = kv.shape[1:]
        pairs = kv.reshape(self.groups, 2, self.head_dim, *tail)
        k, v = pairs[:, 0].reshape(-1, *tail), pairs[:, 1].reshape(-1, *tail)
        return _to_grouped(q, k, v, self.groups, out)

    def invert(self, full: Tensor) -> list[Tensor]:
        import torch

        q, k, v = _from_grouped(full, self.heads, self.groups, self.head_dim)
        tail = k.shape[1:]
        kv = torch.stack((k.reshape(self.groups, self.head_dim, *tail), v.reshape(self.groups, self.head_dim, *tail)),
                         dim=1)
        return [q, kv.reshape(-1, *tail)]
