"""The streaming writer against the plain way (build each rank's state dict in memory, torch.save it),
and the memory bound: a conversion's peak RSS stays flat however large the model."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ms2mg_converter.config import ConvertConfig, LayoutConfig, ModelOverrides, VocabConfig
from ms2mg_converter.plan import ExtraEntry, build_plan, layout_op
from ms2mg_converter.plan.target import split_of
from ms2mg_converter.source import resolve

REPO = Path(__file__).resolve().parents[2]


def in_memory_rank_files(cfg: ConvertConfig, out: Path) -> None:
    """The non-streaming path: whole tensors in memory, the ops' torch `apply`, torch.save per rank."""
    plan = build_plan(cfg)
    a = plan.arch
    src = load_file(str(next(cfg.load_dir.glob("*.safetensors"))))
    tp = cfg.tensor_parallel
    by_name = {lg.name: lg for lg in resolve(plan.source, cfg.ignore_keys).logical.values()}
    for fp in plan.files:
        model: OrderedDict[str, torch.Tensor | None] = OrderedDict()
        for e in fp.entries():
            if isinstance(e, ExtraEntry):
                model[e.key] = None
                continue
            logical = by_name[e.source]
            full = layout_op(logical, a, cfg).apply([src[i.name] for i in logical.inputs])
            kind = split_of(logical.target)
            model[e.key] = kind.shards(full.to(torch.bfloat16), tp, a.swiglu)[fp.tp_rank].clone()
        path = out / fp.path
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"args": argparse.Namespace(**{k: v for k, v in plan.args.items() if k != "params_dtype"}),
                    "checkpoint_version": 3.0, "iteration": 1, "model": model}, path)


def test_streamed_files_equal_torch_save_of_the_same_state(make_sample, convert, tmp_path):
    src, _, _ = make_sample(bias="all", fc1_layout="interleaved", qkv_layout="contiguous", tied=True)
    dst = tmp_path / "streamed"
    flags = ["--num-attention-heads", "8", "--num-query-groups", "4", "--qkv-layout", "contiguous",
             "--source-tensor-parallel-size", "1", "--fc1-layout", "interleaved", "--tp", "2", "--pp", "2",
             "--true-vocab-size", "1000"]
    assert convert(src, dst, *flags) == 0
    cfg = ConvertConfig(load_dir=src, tensor_parallel=2, pipeline_parallel=2,
                        model=ModelOverrides(num_attention_heads=8, num_query_groups=4),
                        layouts=LayoutConfig(qkv="contiguous", fc1="interleaved", source_tensor_parallel=1),
                        vocab=VocabConfig(true_vocab_size=1000))
    in_memory_rank_files(cfg, tmp_path / "plain")
    files = sorted((dst / "iter_0000001").glob("*/model_optim_rng.pt"))
    assert len(files) == 4
    for path in files:
        plain_path = tmp_path / "plain" / path.relative_to(dst)
        with torch.serialization.safe_globals([argparse.Namespace]):
            ours = torch.load(path, weights_only=True)
            plain = torch.load(plain_path, weights_only=True)
        assert list(ours["model"]) == list(plain["model"])
        for key, value in plain["model"].items():
            if value is None:
                assert ours["model"][key] is None
            else:
                assert ours["model"][key].dtype == value.dtype and torch.equal(ours["model"][key], value), key
        assert vars(plain["args"]).items() <= vars(ours["args"]).items()


def _peak_rss_mib(src: Path, dst: Path, heads: int, groups: int) -> float:
    result = dst.parent / f"{dst.name}.json"
    subprocess.run([sys.executable, "-m", "ms2mg_converter", "convert", "--load-dir", str(src), "--save-dir",
                    str(dst), "--num-attention-heads", str(heads), "--num-query-groups", str(groups),
                    "--qkv-layout", "grouped", "--fc1-layout", "gate-up", "--no-verify", "--progress", "none",
                    "--result-file", str(result)], check=True, capture_output=True, timeout=600)
    return json.loads(result.read_text())["peakRssBytes"] / 2**20


@pytest.mark.slow
def test_memory_is_flat_when_the_model_grows(tmp_path):
    """8 and 32 layers of the same width (0.5 GB and 1.6 GB fp32): peak RSS stays the same and far below."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_convert import Model, generate

    small, large = (Model(n, layers, hidden=1024, ffn=2816, vocab=32000) for n, layers in (("s", 8), ("l", 32)))
    peaks = {}
    for m in (small, large):
        src = tmp_path / m.name
        src.mkdir()
        size = generate(m, src / "model.safetensors")
        peaks[m.name] = (_peak_rss_mib(src, tmp_path / f"out-{m.name}", m.heads, m.groups), size / 2**20)
        (src / "model.safetensors").unlink()
    print(f"peak RSS MiB and model MiB: {peaks}")
    (rss_s, size_s), (rss_l, size_l) = peaks["s"], peaks["l"]
    assert size_l > 3 * size_s
    assert rss_l < 0.25 * size_l, peaks
    assert rss_l < 1.15 * rss_s, peaks
