"""Every layout operation: the row map the converter executes (`runs`) equals the torch statement of the
same transform (`apply`), and every operation's `invert` gives its inputs back exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ms2mg_converter.config import Fc1Layout, PadFill, QkvLayout
from ms2mg_converter.layout import (
    Copy,
    Fc1BiasZeros,
    GluFused,
    GluSplit,
    LayoutOp,
    QkvBiasZeros,
    QkvFromQAndKv,
    QkvFused,
    QkvSplit,
    Run,
    Split,
    VocabResize,
    covered,
    select,
)


def apply_runs(runs: list[Run], inputs: list[torch.Tensor]) -> torch.Tensor:
    """Execute a row map with plain torch indexing (what stream.reader.produce does with numpy)."""
    rows = covered(runs)
    tail, dtype = (inputs[0].shape[1:], inputs[0].dtype) if inputs else ((), torch.float32)
    out = torch.empty((rows, *tail), dtype=dtype)
    for r in runs:
        if r.src is None:
            out[r.dst: r.dst + r.count] = 0
        elif r.step == 0:
            out[r.dst: r.dst + r.count] = inputs[r.src][r.start]
        else:
            out[r.dst: r.dst + r.count] = inputs[r.src][r.start: r.start + (r.count - 1) * r.step + 1: r.step]
    return out


def check_op(op: LayoutOp, inputs: list[torch.Tensor]) -> torch.Tensor:
    """runs == apply (also into a given `out`), and invert(apply(x)) == x."""
    full = op.apply(inputs)
    assert torch.equal(apply_runs(op.runs(), inputs), full)
    out = torch.empty_like(full)
    assert torch.equal(op.apply(inputs, out=out), full)
    back = op.invert(full)
    assert len(back) == len(inputs)
    assert all(torch.equal(a, b) for a, b in zip(back, inputs, strict=True))
    return full


def heads_groups():
    return st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5)).map(
        lambda t: (t[0] * t[1], t[1], t[2]))  # (heads, groups, head_dim), heads divisible by groups


def grouped_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Megatron's grouped order, spelled out: per group its q heads, its k head, its v head."""
    qs, ks, vs = q.chunk(groups), k.chunk(groups), v.chunk(groups)
    return torch.cat([torch.cat((qs[g], ks[g], vs[g])) for g in range(groups)])


@settings(max_examples=60, deadline=None)
@given(hg=heads_groups(), layout=st.sampled_from(list(QkvLayout)), cols=st.integers(0, 3))
def test_qkv_fused_row_map_matches_torch_and_inverts(hg, layout, cols):
    heads, groups, d = hg
    q, k, v = (torch.randn((n * d, *([cols] if cols else []))) for n in (heads, groups, groups))
    megatron = grouped_by_hand(q, k, v, groups)
    source = megatron if layout is QkvLayout.GROUPED else torch.cat((q, k, v))
    assert torch.equal(check_op(QkvFused(heads, groups, d, layout), [source]), megatron)


@settings(max_examples=60, deadline=None)
@given(hg=heads_groups(), cols=st.integers(1, 3))
def test_qkv_split_row_map_matches_torch_and_inverts(hg, cols):
    heads, groups, d = hg
    q, k, v = torch.randn(heads * d, cols), torch.randn(groups * d, cols), torch.randn(groups * d, cols)
    assert torch.equal(check_op(QkvSplit(heads, groups, d), [q, k, v]), grouped_by_hand(q, k, v, groups))


@settings(max_examples=40, deadline=None)
@given(ffn=st.integers(1, 40), layout=st.sampled_from(list(Fc1Layout)), cols=st.integers(0, 3))
def test_glu_row_maps_match_torch_and_invert(ffn, layout, cols):
    gate, up = (torch.randn((ffn, *([cols] if cols else []))) for _ in range(2))
    stacked = torch.stack((gate, up), 1).reshape(2 * ffn, *gate.shape[1:])
    source = torch.cat((gate, up)) if layout is Fc1Layout.GATE_UP else stacked
    assert torch.equal(check_op(GluFused(ffn, layout), [source]), torch.cat((gate, up)))
    assert torch.equal(check_op(GluSplit(ffn), [gate, up]), torch.cat((gate, up)))


@settings(max_examples=60, deadline=None)
@given(hg=heads_groups(), t=st.sampled_from([1, 2, 4]), cols=st.integers(0, 3))
def test_contiguous_qkv_per_source_tp_rank(hg, t, cols):
    """Trained at TP t, a contiguous fused qkv is [Q_r;K_r;V_r] for each source rank r."""
    heads, groups, d = hg
    if groups % t:
        return
    q, k, v = (torch.randn((n * d, *([cols] if cols else []))) for n in (heads, groups, groups))
    source = torch.cat([torch.cat((q.chunk(t)[r], k.chunk(t)[r], v.chunk(t)[r])) for r in range(t)])
    megatron = grouped_by_hand(q, k, v, groups)
    assert torch.equal(check_op(QkvFused(heads, groups, d, QkvLayout.CONTIGUOUS, t), [source]), megatron)
    assert torch.equal(check_op(QkvFused(heads, groups, d, QkvLayout.GROUPED, t), [megatron]), megatron)


@settings(max_examples=40, deadline=None)
@given(ffn=st.integers(1, 12), t=st.sampled_from([1, 2, 4]), cols=st.integers(0, 3))
def test_gate_up_per_source_tp_rank(ffn, t, cols):
    """Trained at TP t, a [gate; up] fused fc1 is [G_r; U_r] for each source rank r."""
    f = ffn * t
    gate, up = (torch.randn((f, *([cols] if cols else []))) for _ in range(2))
    source = torch.cat([torch.cat((gate.chunk(t)[r], up.chunk(t)[r])) for r in range(t)])
    assert torch.equal(check_op(GluFused(f, Fc1Layout.GATE_UP, t), [source]), torch.cat((gate, up)))
    interleaved = torch.stack((gate, up), 1).reshape(2 * f, *gate.shape[1:])
    assert torch.equal(check_op(GluFused(f, Fc1Layout.INTERLEAVED, t), [interleaved]), torch.cat((gate, up)))


@settings(max_examples=60, deadline=None)
@given(hg=heads_groups(), cols=st.integers(0, 3))
def test_q_and_per_head_kv(hg, cols):
    """TeleChat2's wk_v: per KV head [k_h; v_h]."""
    heads, groups, d = hg
    q, k, v = (torch.randn((n * d, *([cols] if cols else []))) for n in (heads, groups, groups))
    kv = torch.cat([torch.cat((k[h * d:(h + 1) * d], v[h * d:(h + 1) * d])) for h in range(groups)])
    assert torch.equal(check_op(QkvFromQAndKv(heads, groups, d), [q, kv]), grouped_by_hand(q, k, v, groups))


def test_zero_biases_are_zeros_of_the_right_size():
    class Dims:
        hidden_size, num_attention_heads, num_query_groups, kv_channels = 16, 4, 2, 3
        ffn_hidden_size, swiglu, qkv_layout, fc1_layout, source_tensor_parallel = 5, True, None, None, 1

    for op, rows in ((QkvBiasZeros.bind(Dims(), []), (4 + 4) * 3), (Fc1BiasZeros.bind(Dims(), []), 10)):
        assert torch.equal(check_op(op, []), torch.zeros(rows))
        assert op.runs() == [Run(0, rows, None, 0)]


def test_copy_is_the_identity():
    x = torch.randn(5, 3)
    assert torch.equal(check_op(Copy(5), [x]), x)


def test_interleaved_fc1_really_alternates():
    gate, up = torch.arange(3.0) * 10, torch.arange(3.0) * 10 + 1
    interleaved = torch.stack((gate, up), 1).reshape(-1)  # g0 u0 g1 u1 g2 u2
    got = apply_runs(GluFused(3, Fc1Layout.INTERLEAVED).runs(), [interleaved])
    assert torch.equal(got, torch.cat((gate, up)))


def megatron_pad_weight(x: torch.Tensor, padded: int) -> torch.Tensor:
    """Megatron's saver: keep rows up to the padded size, repeat the last row when growing."""
    if x.shape[0] >= padded:
        return x[:padded]
    return torch.cat((x, x[-1:].expand(padded - x.shape[0], *x.shape[1:])))


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 50), true=st.integers(1, 50), padded=st.integers(1, 80),
       fill=st.sampled_from(list(PadFill)))
def test_vocab_row_map_matches_megatron_pad_weight(rows, true, padded, fill):
    true = min(true, rows)
    padded = max(padded, true)
    x = torch.randn(rows, 3)
    op = VocabResize(rows, true, padded, fill)
    if fill is PadFill.ZERO:
        expected = torch.cat((x[:true], torch.zeros(padded - true, 3)))
    else:
        expected = megatron_pad_weight(x, padded)
    got = op.apply([x])
    assert torch.equal(got, expected)
    assert torch.equal(apply_runs(op.runs(), [x]), expected)
    assert torch.equal(op.invert(got)[0], x[: op.kept])


@settings(max_examples=60, deadline=None)
@given(hg=heads_groups(), tp=st.sampled_from([1, 2, 4]), cols=st.integers(1, 3))
def test_select_is_a_tp_slice_of_the_full_map(hg, tp, cols):
    heads, groups, d = hg
    x = torch.randn((heads + 2 * groups) * d, cols)
    runs = QkvFused(heads, groups, d, QkvLayout.CONTIGUOUS).runs()
    full = apply_runs(runs, [x])
    if groups % tp:
        return
    per = full.shape[0] // tp
    for r in range(tp):
        assert torch.equal(apply_runs(select(runs, r * per, (r + 1) * per), [x]), full[r * per:(r + 1) * per])


@pytest.mark.parametrize("kind", list(Split))
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("swiglu", [True, False])
def test_tp_split_then_merge_is_identity_and_matches_the_row_ranges(kind, tp, swiglu):
    x = torch.randn(16, 8)
    shards = kind.shards(x, tp, swiglu)
    assert len(shards) == tp
    assert torch.equal(kind.merge(shards, swiglu), x)
    for r, shard in enumerate(shards):
        rows = torch.cat([x[a:b] for a, b in kind.row_ranges(16, tp, r, swiglu)])
        c = kind.col_range(8, tp, r)
        assert torch.equal(shard, rows if c is None else rows[:, c[0]:c[1]])


def test_glu_tp_split_gives_gate_and_up_halves_per_rank():
    gate, up = torch.arange(4.0), torch.arange(4.0) + 100
    shards = Split.GLU.shards(torch.cat((gate, up)), 2, swiglu=True)
    assert torch.equal(shards[0], torch.tensor([0.0, 1, 100, 101]))
    assert torch.equal(shards[1], torch.tensor([2.0, 3, 102, 103]))


def test_covered_rejects_gaps():
    with pytest.raises(ValueError, match="gap"):
        covered([Run(0, 2, 0, 0), Run(3, 1, 0, 2)])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_finite_check_catches_every_nonfinite_pattern(dtype):
    import numpy as np

    from ms2mg_converter.config import DType
    from ms2mg_converter.stream.reader import OUT_DTYPES, FiniteCheck

    check = FiniteCheck(DType(dtype))
    finite = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 1e-8, -1e-8], dtype=np.float32)
    assert not check.bad(finite.astype(OUT_DTYPES[DType(dtype)]))
    import ml_dtypes

    big = ml_dtypes.finfo(OUT_DTYPES[DType(dtype)])
    assert not check.bad(np.array([big.max, big.min, big.tiny, -big.tiny], dtype=OUT_DTYPES[DType(dtype)]))
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        arr = np.concatenate([finite, np.array([bad], dtype=np.float32)]).astype(OUT_DTYPES[DType(dtype)])
        assert check.bad(arr), bad
    bits = {"bf16": np.uint16, "fp16": np.uint16, "fp32": np.uint32}[dtype]
    exp = {"bf16": 0x7F80, "fp16": 0x7C00, "fp32": 0x7F800000}[dtype]
    sign = {"bf16": 0x8000, "fp16": 0x8000, "fp32": 0x80000000}[dtype]
    for payload in (0, 1, exp // 2 + 1):  # inf, a signalling NaN, some payload
        for s in (0, sign):
            arr = np.array([exp | (payload & (~exp & (sign - 1))) | s], dtype=bits)
            assert check.bad(arr.view(OUT_DTYPES[DType(dtype)]))
