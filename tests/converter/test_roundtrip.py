"""Round trips: convert, re-merge the TP/PP shards with Megatron's rules, undo the layouts: equal the source.

Two independent expectations for every conversion:
1. the merged (TP1/PP1) Megatron tensors equal the sample's logical weights fused the Megatron way
   (grouped QKV, [gate; up]) and cast, with the vocabulary padded as Megatron's saver pads it;
2. undoing the layout steps gives back the MindFormers source tensors exactly (mcore names).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ms2mg_converter import checks
from ms2mg_converter.config import Fc1Layout, QkvLayout
from ms2mg_converter.demo.sample import SampleSpec, mindformers_tensors
from tests.converter.conftest import sample_flags
from tests.converter.roundtrip import back_to_source, merge_checkpoint

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SRC_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def megatron_expected(spec: SampleSpec, weights: dict[str, torch.Tensor], out: torch.dtype,
                      padded: int) -> dict[str, torch.Tensor]:
    """What the full Megatron model must hold, from the logical weights (not from the converter)."""
    meg = dataclasses.replace(spec, names="mcore", qkv_layout="grouped", fc1_layout="gate-up", extra_keys=False,
                              legacy_fused=False)
    tensors = {k: v.to(SRC_DTYPES[spec.dtype]).to(out) for k, v in mindformers_tensors(meg, weights).items()}
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in tensors:
            t = tensors[name]
            if padded > t.shape[0]:
                t = torch.cat((t, t[-1:].expand(padded - t.shape[0], -1)))
            tensors[name] = t[:padded]
    return tensors


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), f"{name} differs"


def roundtrip(make_sample, convert, tmp_path: Path, tp: int, pp: int, out: str = "bf16",
              true_vocab: int | None = None, extra: tuple[str, ...] = (), **spec_kw: object) -> None:
    src, spec, weights = make_sample(**spec_kw)
    dst = tmp_path / f"out-tp{tp}-pp{pp}"
    flags = [*sample_flags(spec), "--tp", str(tp), "--pp", str(pp), "--dtype", out, *extra]
    if true_vocab:
        flags += ["--true-vocab-size", str(true_vocab)]
    assert convert(src, dst, *flags) == 0
    merged, args = merge_checkpoint(dst)
    padded = checks.padded_vocab_size(true_vocab, 128, tp) if true_vocab else spec.vocab_size
    assert args.padded_vocab_size == padded
    assert_same(merged, megatron_expected(spec, weights, OUT_DTYPES[out], padded))
    if spec.names == "mcore":
        back = back_to_source(merged, args, QkvLayout(spec.qkv_layout), Fc1Layout(spec.fc1_layout), spec.vocab_size)
        source = {k: v.to(OUT_DTYPES[out]) for k, v in mindformers_tensors(spec, weights).items()
                  if not k.startswith(("adam_", "global_step", "epoch_num", "step_num", "loss_scale", "scale_sense"))
                  and "dropout" not in k}
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in source:
                source[name] = source[name][: min(padded, spec.vocab_size)]
        assert_same(back, source)


GRID = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2, 4)]


@pytest.mark.parametrize(("tp", "pp"), GRID)
def test_gqa_biases_untied_every_split(make_sample, convert, tmp_path, tp, pp):
    roundtrip(make_sample, convert, tmp_path, tp, pp, bias="all", true_vocab=1000)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2), (4, 1), (1, 4)])
def test_mha_tied_no_bias(make_sample, convert, tmp_path, tp, pp):
    roundtrip(make_sample, convert, tmp_path, tp, pp, num_query_groups=8, tied=True, true_vocab=997)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2), (4, 4)])
def test_contiguous_qkv_interleaved_fc1(make_sample, convert, tmp_path, tp, pp):
    roundtrip(make_sample, convert, tmp_path, tp, pp, qkv_layout="contiguous", fc1_layout="interleaved",
              bias="all", true_vocab=1000)


@pytest.mark.parametrize("out", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("source_dtype", ["fp32", "bf16", "fp16"])
def test_dtypes(make_sample, convert, tmp_path, out, source_dtype):
    roundtrip(make_sample, convert, tmp_path, 2, 2, out=out, true_vocab=1000, dtype=source_dtype)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2)])
def test_qwen2_qkv_bias_only(make_sample, convert, tmp_path, tp, pp):
    roundtrip(make_sample, convert, tmp_path, tp, pp, bias="qkv", true_vocab=1000)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2)])
def test_qwen3_qk_layernorm_and_kv_channels(make_sample, convert, tmp_path, tp, pp):
    roundtrip(make_sample, convert, tmp_path, tp, pp, qk_layernorm=True, kv_channels=16, true_vocab=1000)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2)])
def test_layernorm_learned_positions_no_swiglu(make_sample, convert, tmp_path, tp, pp):
    roundtrip(make_sample, convert, tmp_path, tp, pp, normalization="LayerNorm",
              position_embedding_type="learned_absolute", swiglu=False, bias="all", true_vocab=1000)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2), (4, 2)])
@pytest.mark.parametrize("fused", [False, True])
def test_legacy_names(make_sample, convert, tmp_path, tp, pp, fused):
    roundtrip(make_sample, convert, tmp_path, tp, pp, names="legacy", legacy_fused=fused, bias="qkv",
              true_vocab=1000)


def test_sharded_source_with_index_and_optimizer_keys(make_sample, convert, tmp_path):
    roundtrip(make_sample, convert, tmp_path, 2, 2, files=3, index_json=True, extra_keys=True, true_vocab=1000)


def test_vocab_trim_when_table_is_larger(make_sample, convert, tmp_path):
    # 1000 rows, true vocab 700 -> padded 768: Megatron keeps rows 0..767 of the source (no re-padding)
    roundtrip(make_sample, convert, tmp_path, 2, 1, true_vocab=700)


def test_no_true_vocab_keeps_rows(make_sample, convert, tmp_path):
    roundtrip(make_sample, convert, tmp_path, 2, 2, vocab_size=1000)


def test_transformer_engine_names_merge_back(make_sample, convert, tmp_path):
    roundtrip(make_sample, convert, tmp_path, 2, 2, extra=("--saver-transformer-impl", "transformer_engine"),
              bias="all", normalization="LayerNorm", true_vocab=1000)


def test_zero_vocab_fill(make_sample, convert, tmp_path):
    src, spec, _ = make_sample(vocab_size=1000)
    dst = tmp_path / "zero"
    assert convert(src, dst, *sample_flags(spec), "--tp", "2", "--true-vocab-size", "990",
                   "--vocab-pad-fill", "zero") == 0
    merged, _ = merge_checkpoint(dst)
    emb = merged["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 1024
    assert torch.count_nonzero(emb[990:]) == 0
    assert torch.count_nonzero(emb[:990].float().abs().sum(1)) == 990


def test_legacy_layernorm_biases(make_sample, convert, tmp_path):
    roundtrip(make_sample, convert, tmp_path, 2, 2, names="legacy", normalization="LayerNorm", true_vocab=1000)
