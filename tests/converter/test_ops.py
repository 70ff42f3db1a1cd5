"""Every layout operation: the row map the converter executes equals the torch statement of the same
transform (reference_ops), and every torch transform has an inverse that gives the input back exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ms2mg_converter import ops
from ms2mg_converter import reference_ops as ref
from ms2mg_converter.config import Fc1Layout, PadFill, QkvLayout


def apply_runs(runs: list[ops.Run], inputs: list[torch.Tensor]) -> torch.Tensor:
    """Execute a row map with plain torch indexing (what reader.produce does with numpy)."""
    rows = ops.covered(runs)
    out = torch.empty((rows, *inputs[0].shape[1:]), dtype=inputs[0].dtype)
    for r in runs:
        if r.src is None:
            out[r.dst: r.dst + r.count] = 0
        elif r.step == 0:
            out[r.dst: r.dst + r.count] = inputs[r.src][r.start]
        else:
            out[r.dst: r.dst + r.count] = inputs[r.src][r.start: r.start + (r.count - 1) * r.step + 1: r.step]
    return out


def heads_groups():
    return st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5)).map(
        lambda t: (t[0] * t[1], t[1], t[2]))  # (heads, groups, head_dim), heads divisible by groups


@settings(max_examples=60, deadline=None)
@given(hg=heads_groups(), layout=st.sampled_from(list(QkvLayout)), cols=st.integers(0, 3))
def test_qkv_fused_row_map_matches_torch_and_inverts(hg, layout, cols):
    heads, groups, d = hg
    shape = ((heads + 2 * groups) * d, *([cols] if cols else []))
    x = torch.randn(shape)
    runs = ops.qkv_fused(heads, groups, d, layout)
    grouped = ref.qkv_to_grouped(x, heads, groups, d, layout)
    assert torch.equal(apply_runs(runs, [x]), grouped)
    assert torch.equal(ref.qkv_from_grouped(grouped, heads, groups, d, layout), x)


@settings(max_examples=60, deadline=None)
@given(hg=heads_groups(), cols=st.integers(1, 3))
def test_qkv_split_row_map_matches_torch_and_inverts(hg, cols):
    heads, groups, d = hg
    q, k, v = torch.randn(heads * d, cols), torch.randn(groups * d, cols), torch.randn(groups * d, cols)
    grouped = ref.qkv_split_to_grouped(q, k, v, groups)
    assert torch.equal(apply_runs(ops.qkv_split(heads, groups, d), [q, k, v]), grouped)
    back = ref.qkv_grouped_to_split(grouped, heads, groups, d)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


@settings(max_examples=40, deadline=None)
@given(ffn=st.integers(1, 40), layout=st.sampled_from(list(Fc1Layout)), cols=st.integers(0, 3))
def test_glu_row_maps_match_torch_and_invert(ffn, layout, cols):
    x = torch.randn((2 * ffn, *([cols] if cols else [])))
    gate_up = ref.glu_to_gate_up(x, layout)
    assert torch.equal(apply_runs(ops.glu_fused(ffn, layout), [x]), gate_up)
    assert torch.equal(ref.glu_from_gate_up(gate_up, layout), x)
    g, u = x[:ffn], x[ffn:]
    assert torch.equal(apply_runs(ops.glu_split(ffn), [g, u]), torch.cat((g, u)))


def test_interleaved_fc1_really_alternates():
    gate, up = torch.arange(3.0) * 10, torch.arange(3.0) * 10 + 1
    interleaved = torch.stack((gate, up), 1).reshape(-1)  # g0 u0 g1 u1 g2 u2
    assert torch.equal(apply_runs(ops.glu_fused(3, Fc1Layout.INTERLEAVED), [interleaved]), torch.cat((gate, up)))


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 50), true=st.integers(1, 50), padded=st.integers(1, 80),
       fill=st.sampled_from(list(PadFill)))
def test_vocab_row_map_matches_megatron_pad_weight(rows, true, padded, fill):
    true = min(true, rows)
    padded = max(padded, true)
    x = torch.randn(rows, 3)
    got = apply_runs(ops.vocab(rows, true, padded, fill), [x])
    assert torch.equal(got, ref.vocab_pad(x, true, padded, zero_fill=fill is PadFill.ZERO))


@settings(max_examples=60, deadline=None)
@given(hg=heads_groups(), tp=st.sampled_from([1, 2, 4]), cols=st.integers(1, 3))
def test_select_is_a_tp_slice_of_the_full_map(hg, tp, cols):
    heads, groups, d = hg
    x = torch.randn((heads + 2 * groups) * d, cols)
    runs = ops.qkv_fused(heads, groups, d, QkvLayout.CONTIGUOUS)
    full = apply_runs(runs, [x])
    if groups % tp:
        return
    per = full.shape[0] // tp
    for r in range(tp):
        assert torch.equal(apply_runs(ops.select(runs, r * per, (r + 1) * per), [x]), full[r * per:(r + 1) * per])


@pytest.mark.parametrize("kind", ["vocab", "column", "glu", "row", "replicated"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("swiglu", [True, False])
def test_tp_split_then_merge_is_identity(kind, tp, swiglu):
    x = torch.randn(16, 8)
    shards = ref.tp_split(x, kind, tp, swiglu)
    assert len(shards) == tp
    assert torch.equal(ref.tp_merge(shards, kind, swiglu), x)


def test_glu_tp_split_gives_gate_and_up_halves_per_rank():
    gate, up = torch.arange(4.0), torch.arange(4.0) + 100
    shards = ref.tp_split(torch.cat((gate, up)), "glu", 2, swiglu=True)
    assert torch.equal(shards[0], torch.tensor([0.0, 1, 100, 101]))
    assert torch.equal(shards[1], torch.tensor([2.0, 3, 102, 103]))


def test_covered_rejects_gaps():
    with pytest.raises(ValueError, match="gap"):
        ops.covered([ops.Run(0, 2, 0, 0), ops.Run(3, 1, 0, 2)])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_finite_check_catches_every_nonfinite_pattern(dtype):
    import numpy as np

    from ms2mg_converter.config import DType
    from ms2mg_converter.reader import OUT_DTYPES, FiniteCheck

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
