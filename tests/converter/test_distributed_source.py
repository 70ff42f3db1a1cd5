"""Distributed MindFormers sources (`rank_N/` safetensors + strategy): converted exactly as the merged checkpoint.

The distributed source is cut from the merged sample by `_mf_distributed` (torch.chunk + its own protobuf
encoder, no converter code), converted, and every output tensor compared with `torch.equal` against the
conversion of the merged sample; one case is strict-loaded into megatron-core. Bad inputs are refused with
exit 3 and a message naming the rank, file or tensor.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ms2mg_converter.errors import SourceError
from ms2mg_converter.source import distributed as dist
from ms2mg_converter.source.index import open_source
from ms2mg_converter.source.strategy import ParamLayout, read_strategy
from tests.converter._mf_distributed import Layout, distribute
from tests.converter.conftest import sample_flags
from tests.converter.roundtrip import load_rank_files


def _outputs(root: Path) -> dict[str, torch.Tensor]:
    files, _ = load_rank_files(root)
    return {f"{t}.{p}.{k}": v for (t, p), sd in files.items() for k, v in sd["model"].items()
            if isinstance(v, torch.Tensor)}


def _assert_equal_outputs(a: Path, b: Path) -> None:
    got, exp = _outputs(a), _outputs(b)
    assert sorted(got) == sorted(exp)
    for k, v in exp.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


CASES = {
    "tp2": (Layout(tp=2, dp=2), {}),
    "tp4-json": (Layout(tp=4, dp=1, fmt="json"), {}),
    "tp2-opt-shard-packed": (Layout(tp=2, dp=2, opt_shard=True, fmt="proto-packed"), {}),
    "tp4-dp2-embedding-two-axes": (Layout(tp=4, dp=2, embedding_dp_tp=True), {"bias": "all"}),
    "tp2-pp2-tied": (Layout(tp=2, dp=1, pp=2), {"tied": True}),
    "tp2-pp2-opt-shard": (Layout(tp=2, dp=2, pp=2, opt_shard=True), {"qk_layernorm": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("out_tp", "out_pp"), [(1, 1), (2, 2)])
def test_distributed_equals_merged(make_sample, convert, tmp_path, case, out_tp, out_pp):
    lay, kw = CASES[case]
    src, spec, _ = make_sample(**kw)
    ckpt = tmp_path / "output" / "checkpoint"
    distribute(src, ckpt, lay, spec.num_layers, spec.tied)
    flags = [*sample_flags(spec), "--tp", str(out_tp), "--pp", str(out_pp)]
    assert convert(src, tmp_path / "merged", *flags) == 0
    assert convert(ckpt, tmp_path / "dist", *flags) == 0  # strategy found in output/strategy/
    _assert_equal_outputs(tmp_path / "dist", tmp_path / "merged")


def test_index_pieces_read_once(make_sample, tmp_path):
    src, spec, _ = make_sample()
    distribute(src, tmp_path / "ckpt", Layout(tp=2, dp=2), spec.num_layers, spec.tied)
    index = open_source(tmp_path / "ckpt")
    qkv = index.tensors["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert len(qkv.pieces) == 2 and {p.file.parent.name for p in qkv.pieces} == {"rank_0", "rank_1"}
    proj = index.tensors["decoder.layers.0.self_attention.linear_proj.weight"]
    assert [p.start for p in proj.pieces] == [(0, 0), (0, spec.hidden_size // 2)]
    norm = index.tensors["decoder.final_layernorm.weight"]
    assert not norm.pieces and norm.file.parent.name == "rank_0"  # replicated: one rank's copy
    merged = load_file(next(src.glob("*.safetensors")))
    for name, info in index.tensors.items():
        if name in merged:
            assert info.shape == tuple(merged[name].shape), name


def test_strategy_decoder_packed_and_negative(tmp_path):
    from tests.converter._mf_distributed import _proto

    raw = _proto(3, {"w": {"dev_matrix": [2, 4], "tensor_map": [[1, 0], -1], "opt_weight_shard_step": 1,
                           "opt_weight_shard_size": -1}}, packed=True)
    (tmp_path / "s.ckpt").write_bytes(raw)
    (st,) = read_strategy(tmp_path / "s.ckpt")
    assert st.stage == 3
    assert st.layouts["w"] == ParamLayout((2, 4), ((1, 0), (-1,)), 1, -1, 0)


def test_slice_box_opt_shard_matches_chunk():
    lay = ParamLayout((2, 2), ((0,), (-1,)), 1, 2)  # rows over tp, then dp halves of each tp block
    truth = torch.arange(16 * 3).reshape(16, 3)
    for device in range(4):
        d, k = divmod(device, 2)
        local = torch.chunk(torch.chunk(truth, 2, 0)[k], 2, 0)[d]
        shape, box = dist.slice_box(lay, device, tuple(local.shape), "t")
        assert shape == (16, 3)
        assert torch.equal(truth[box[0][0]:box[0][1], box[1][0]:box[1][1]], local)


# -- bad input ------------------------------------------------------------------------------------------


@pytest.fixture
def dist_src(make_sample, tmp_path):
    src, spec, _ = make_sample()
    ckpt = tmp_path / "output" / "checkpoint"
    distribute(src, ckpt, Layout(tp=2, dp=2), spec.num_layers, spec.tied)
    return ckpt


def _refused(path: Path, *words: str, **kw: object) -> None:
    with pytest.raises(SourceError) as e:
        open_source(path, **kw)  # type: ignore[arg-type]
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_rank_dir(dist_src):
    shutil.rmtree(dist_src / "rank_1")
    _refused(dist_src, "rank_1", "missing")


def test_rank_count_differs_from_strategy(dist_src):
    shutil.rmtree(dist_src / "rank_3")
    _refused(dist_src, "3 rank_N directories", "4 devices", "4 ranks")


def _drop(rank_dir: Path, name: str) -> None:
    f = next(rank_dir.glob("*.safetensors"))
    tensors = load_file(f)
    del tensors[name]
    save_file(tensors, f, metadata={"format": "ms"})


def test_rank_missing_a_parameter(dist_src):
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    _drop(dist_src / "rank_1", name)  # its data-parallel replica on rank_3 still holds the slice: accepted
    assert name in open_source(dist_src).tensors
    _drop(dist_src / "rank_3", name)
    _refused(dist_src, name, "rank_1", "rank_3", "lack")


def test_slice_shape_inconsistent(dist_src):
    f = next((dist_src / "rank_2").glob("*.safetensors"))
    tensors = load_file(f)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, f, metadata={"format": "ms"})
    _refused(dist_src, name, "rank_2", "implies the whole tensor")


def test_no_strategy(dist_src):
    shutil.rmtree(dist_src.parent / "strategy")
    _refused(dist_src, "no strategy file", "--src-strategy")


def test_truncated_strategy(dist_src):
    for f in (dist_src.parent / "strategy").iterdir():
        f.write_bytes(f.read_bytes()[:-5])
    _refused(dist_src, "strategy", "ckpt_strategy_rank_0.ckpt")


def test_strategy_of_another_layout(make_sample, convert, tmp_path):
    src, spec, _ = make_sample()
    ckpt, other = tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint"
    distribute(src, ckpt, Layout(tp=2, dp=2), spec.num_layers, spec.tied)
    distribute(src, other, Layout(tp=4, dp=1), spec.num_layers, spec.tied)
    # same 4 ranks, but the strategy says tp4: the merged shapes are wrong, and the architecture check says so
    flags = [*sample_flags(spec), "--src-strategy", str(other.parent / "strategy")]
    assert convert(ckpt, tmp_path / "out", *flags) == 3
    assert not (tmp_path / "out").exists()


def test_explicit_strategy_file_and_suffix(dist_src, tmp_path):
    moved = tmp_path / "strat"
    shutil.move(dist_src.parent / "strategy", moved)
    index = open_source(dist_src, strategy=moved, suffix="1_1")
    assert "decoder.layers.0.mlp.linear_fc1.weight" in index.tensors
    _refused(dist_src, "2_5.safetensors", strategy=moved, suffix="2_5")


def test_overlap_and_gap_detected():
    f = dist._Found(0, "F32", (4, 2), "r0", {((0, 3), (0, 2)): None, ((2, 4), (0, 2)): None}, [0, 1])  # type: ignore[dict-item]
    with pytest.raises(SourceError, match="overlap"):
        dist.check_coverage("w", f, [0, 1], {})
    f = dist._Found(0, "F32", (4, 2), "r0", {((0, 2), (0, 2)): None}, [0])  # type: ignore[dict-item]
    with pytest.raises(SourceError, match="rank_1"):
        dist.check_coverage("w", f, [0, 1], {1: Path("rank_1/x.safetensors")})


@pytest.mark.consumer
@pytest.mark.parametrize(("out_tp", "out_pp"), [(1, 1), (2, 2)])
def test_distributed_output_loads_strict_in_megatron_core(tmp_path, out_tp, out_pp):
    from ms2mg_converter.demo.sample import SampleSpec, build_sample
    from tests.converter import megatron_consumer as mc
    from tests.converter import reference_model as ref
    from tests.converter.test_megatron_consumer import INPUT_IDS, assert_matches_reference, convert_flags, run_convert

    spec = SampleSpec(bias="all")
    weights = build_sample(spec, tmp_path / "src")
    ckpt = tmp_path / "output" / "checkpoint"
    distribute(tmp_path / "src", ckpt, Layout(tp=2, dp=2, pp=2, opt_shard=True), spec.num_layers, spec.tied)
    out = run_convert(ckpt, tmp_path / "dst", convert_flags(spec, out_tp, out_pp))
    checkpoint = mc.open_checkpoint(out)
    assert len(mc.load_all_ranks_strict(checkpoint)) == out_tp * out_pp
    if out_tp == 1:
        logits = mc.logits_in_process(checkpoint, INPUT_IDS)
        assert_matches_reference(logits, ref.reference_logits(ref.rounded(weights, spec), spec, INPUT_IDS))


@pytest.mark.parametrize("cut", ["rows", "cols", "both", "3d"])
def test_piece_window_small_windows_match_truth(tmp_path, cut):
    """`PieceWindow` with windows of a few rows (slice boundaries inside windows, windows inside slices)."""
    import numpy as np

    from ms2mg_converter.plan import Read
    from ms2mg_converter.source.index import Piece
    from ms2mg_converter.stream.gather import PieceWindow

    shape = (2, 12, 9) if cut == "3d" else (13, 10)
    truth = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    r_cuts = {"rows": [0, 5, 13], "cols": [0, 13], "both": [0, 7, 13], "3d": [0, 1, 2]}[cut]
    c_cuts = {"rows": [0, 10], "cols": [0, 3, 10], "both": [0, 4, 10], "3d": [0, 5, 12]}[cut]
    pieces, blob = [], b""
    for r0, r1 in itertools.pairwise(r_cuts):
        for c0, c1 in itertools.pairwise(c_cuts):
            part = np.ascontiguousarray(truth[r0:r1, c0:c1])
            start = (r0, c0) + (0,) * (len(shape) - 2)
            pieces.append(Piece(tmp_path / "f.bin", 16 + len(blob), start, part.shape))
            blob += part.tobytes()
    (tmp_path / "f.bin").write_bytes(b"\0" * 16 + blob)
    cols = int(np.prod(shape[1:]))
    read = Read("w", str(tmp_path / "f.bin"), 16, "F32", shape[0], cols, tuple(pieces))
    flat = truth.reshape(shape[0], cols)
    win = PieceWindow(read, np.dtype(np.float32), 3 * cols * 4, None)
    try:
        for a in range(shape[0]):
            for b in range(a + 1, shape[0] + 1):
                assert np.array_equal(win.rows(a, b, shape[0]), flat[a:b]), (a, b)
    finally:
        win.close()


def test_suffix_prefers_the_whole_epoch_step(dist_src):
    for r in range(4):
        d = dist_src / f"rank_{r}"
        shutil.copy(d / f"net_rank_{r}-1_1.safetensors", d / f"net_rank_{r}-11_1.safetensors")
        (d / "meta.json").unlink()
    index = open_source(dist_src, suffix="1_1")
    assert all(f.path.name.endswith("-1_1.safetensors") for f in index.files)
    assert all(f.path.name.endswith("-11_1.safetensors") for f in open_source(dist_src).files)  # the last step


@pytest.mark.parametrize("case", ["tp2-opt-shard-packed", "tp2-pp2-tied"])
def test_distributed_source_to_torch_dist_equals_merged(make_sample, convert, tmp_path, case):
    """--ckpt-format torch_dist from a distributed source: verified on write, and its data file holds the same
    bytes as the one converted from the merged checkpoint."""
    lay, kw = CASES[case]
    src, spec, _ = make_sample(**kw)
    ckpt = tmp_path / "output" / "checkpoint"
    distribute(src, ckpt, lay, spec.num_layers, spec.tied)
    flags = [*sample_flags(spec), "--tp", "2", "--ckpt-format", "torch_dist"]
    assert convert(src, tmp_path / "merged", *flags) == 0
    assert convert(ckpt, tmp_path / "dist", *flags) == 0
    data = "iter_0000001/__0_0.distcp"
    assert (tmp_path / "dist" / data).read_bytes() == (tmp_path / "merged" / data).read_bytes()
