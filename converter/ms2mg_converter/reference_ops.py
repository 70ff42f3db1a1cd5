"""The named layout operations and Megatron's tensor-parallel rules, written again with torch.

The converter moves rows by row maps (`ops.py`, `plan.py`); this module states the same transforms the
way Megatron's own tools do (view, split, cat, chunk), each with its inverse. `ms2mg verify` uses it to
check a written checkpoint independently of the writing code path, and the round-trip tests use the
inverses (split then re-merge must give back the source, bit for bit).
"""

from __future__ import annotations

import torch

from ms2mg_converter.config import Fc1Layout, QkvLayout

Tensor = torch.Tensor


def qkv_split_to_grouped(q: Tensor, k: Tensor, v: Tensor, groups: int, out: Tensor | None = None) -> Tensor:
    """Megatron's per-group order: for each group its q heads, then its k head, then its v head.

    `out`, if given, is a contiguous tensor of the result's shape to write into (no allocation)."""
    tail = q.shape[1:]
    parts = (q.reshape(groups, -1, *tail), k.reshape(groups, -1, *tail), v.reshape(groups, -1, *tail))
    if out is None:
        return torch.cat(parts, dim=1).reshape(-1, *tail)
    torch.cat(parts, dim=1, out=out.view(groups, -1, *tail))
    return out


def qkv_grouped_to_split(x: Tensor, heads: int, groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    per = heads // groups * head_dim
    g = x.reshape(groups, per + 2 * head_dim, *x.shape[1:])
    q, k, v = torch.split(g, [per, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *x.shape[1:]), k.reshape(-1, *x.shape[1:]), v.reshape(-1, *x.shape[1:]))


def qkv_to_grouped(x: Tensor, heads: int, groups: int, head_dim: int, layout: QkvLayout,
                   out: Tensor | None = None) -> Tensor:
    if layout is QkvLayout.GROUPED:
        return x
    q, k, v = torch.split(x, [heads * head_dim, groups * head_dim, groups * head_dim], dim=0)
    return qkv_split_to_grouped(q, k, v, groups, out)


def qkv_from_grouped(x: Tensor, heads: int, groups: int, head_dim: int, layout: QkvLayout) -> Tensor:
    if layout is QkvLayout.GROUPED:
        return x
    return torch.cat(qkv_grouped_to_split(x, heads, groups, head_dim), dim=0)


def glu_to_gate_up(x: Tensor, layout: Fc1Layout, out: Tensor | None = None) -> Tensor:
    if layout is Fc1Layout.GATE_UP:
        return x
    if out is None:
        return torch.cat((x[0::2], x[1::2]), dim=0)
    return torch.cat((x[0::2], x[1::2]), dim=0, out=out)


def glu_from_gate_up(x: Tensor, layout: Fc1Layout) -> Tensor:
    if layout is Fc1Layout.GATE_UP:
        return x
    gate, up = torch.chunk(x, 2, dim=0)
    return torch.stack((gate, up), dim=1).reshape(x.shape)


def vocab_pad(x: Tensor, true_rows: int, padded_rows: int, zero_fill: bool) -> Tensor:
    """Megatron's saver `pad_weight` (replicate the last row) or zero rows past the true vocabulary."""
    if zero_fill:
        out = torch.zeros((padded_rows, *x.shape[1:]), dtype=x.dtype)
        out[:true_rows] = x[:true_rows]
        return out
    if x.shape[0] >= padded_rows:
        return x[:padded_rows]
    extra = x[-1:].expand(padded_rows - x.shape[0], *x.shape[1:])
    return torch.cat((x, extra), dim=0)


# --- Megatron's tensor-parallel split rules (tools/checkpoint: chunk_weight / chunk_bias) --------------

def glu_shard_parts(full: Tensor, tp: int, rank: int) -> tuple[Tensor, Tensor]:
    """Rank `rank`'s SwiGLU fc1 shard is [gate_r; up_r]: the two halves, as views of `full`."""
    gate, up = torch.chunk(full, 2, dim=0)
    return torch.chunk(gate, tp)[rank], torch.chunk(up, tp)[rank]


def tp_split(full: Tensor, kind: str, tp: int, swiglu: bool) -> list[Tensor]:
    """Shards of `full` for each TP rank, for a split kind of `target.Split`."""
    if kind == "glu" and swiglu:
        return [torch.cat(glu_shard_parts(full, tp, r), dim=0) for r in range(tp)]
    if kind in ("vocab", "column", "glu"):
        return list(torch.chunk(full, tp, dim=0))
    if kind == "row":
        return list(torch.chunk(full, tp, dim=1))
    return [full] * tp


def tp_merge(shards: list[Tensor], kind: str, swiglu: bool) -> Tensor:
    """The inverse of `tp_split` (replicated shards must all be equal)."""
    if kind == "glu" and swiglu:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if kind in ("vocab", "column", "glu"):
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    if not all(torch.equal(s, shards[0]) for s in shards[1:]):
        raise ValueError("replicated shards differ between tensor-parallel ranks")
    return shards[0]
