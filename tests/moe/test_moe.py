"""MoE conversion against the independent truth (tests/moe/fixture.py): every rank file at TP/EP combos,
both MindFormers weight1 shapes, both expert key layouts; args; and refusals of bad input."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ms2mg_converter.config import ConvertConfig, MoeConfig
from ms2mg_converter.errors import ConversionError, MissingKeyError, ParallelismError, ShapeError, UsageError
from ms2mg_converter.plan import build_plan
from tests.families.runner import convert, load_rank_files
from tests.moe.fixture import MoeDims, expected_ranks, make_truth, mindformers_tensors, write_mindformers

CASES = [  # (MindFormers version, TP, EP, grouped-GEMM keys)
    ("r1.7", 1, 1, False),
    ("r1.7", 1, 2, False),
    ("r1.6", 2, 2, False),
    ("r1.7", 2, 2, True),
    ("r1.7", 1, 4, False),
]


@pytest.mark.parametrize(("version", "tp", "ep", "grouped"), CASES)
def test_rank_files_match_truth(tmp_path: Path, version: str, tp: int, ep: int, grouped: bool) -> None:
    d = MoeDims(version=version)
    truth = make_truth(d)
    src, cfg = write_mindformers(tmp_path, d, truth)
    out = tmp_path / "out"
    flags = ["--tp", str(tp), "--target-expert-parallel-size", str(ep), *(["--moe-grouped-gemm"] if grouped else [])]
    run = convert("--load-dir", str(src), "--config", str(cfg), "--save-dir", str(out), *flags)
    assert run.returncode == 0, run.stderr
    got = load_rank_files(out)
    want = expected_ranks(d, truth, tp, ep, grouped)
    assert sorted(got) == sorted(want)
    for name, tensors in want.items():
        model = got[name]["model"]
        weights = {k for k in model if not k.endswith("_extra_state")}
        assert weights == set(tensors), (name, sorted(weights ^ set(tensors)))
        for key, exp in tensors.items():
            assert torch.equal(model[key], exp.to(torch.bfloat16)), (name, key)
        extras = {k for k in model if k.endswith("_extra_state")}
        assert all(model[k] is None for k in extras)
        if grouped:
            assert "decoder.layers.1.mlp.experts.linear_fc1._extra_state" in extras
        args = got[name]["args"]
        assert isinstance(args, argparse.Namespace)
        assert (args.num_experts, args.moe_ffn_hidden_size, args.moe_shared_expert_intermediate_size) == (4, 16, 24)
        assert args.moe_layer_freq == [0, 1, 1] and args.moe_router_topk == 2
        assert (args.expert_model_parallel_size, args.expert_tensor_parallel_size) == (ep, tp)
        assert args.moe_grouped_gemm is grouped and args.moe_router_enable_expert_bias is True
        assert args.moe_router_score_function == "sigmoid" and args.moe_router_topk_scaling_factor == 2.5
        assert args.sequence_parallel is (tp > 1)


def _plan(src: Path, cfg: Path | None, **moe: object) -> object:
    return build_plan(ConvertConfig(load_dir=src, config_yaml=cfg, moe=MoeConfig(**moe)))  # type: ignore[arg-type]


def _source(tmp_path: Path, d: MoeDims, **kw: object) -> tuple[Path, Path]:
    return write_mindformers(tmp_path, d, make_truth(d), **kw)  # type: ignore[arg-type]


def _custom(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    """The fixture's YAML with these MindFormers tensors instead."""
    from safetensors.torch import save_file

    src, cfg = _source(tmp_path, MoeDims())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(src / "model.safetensors"))
    return src, cfg


def test_missing_expert_tensor(tmp_path: Path) -> None:
    src, cfg = _source(tmp_path, MoeDims(), drop=("decoder.layers.2.mlp.experts.weight2",))
    with pytest.raises(MissingKeyError, match=r"no decoder.layers.2.mlp.experts.weight2"):
        _plan(src, cfg)


def test_experts_without_router(tmp_path: Path) -> None:
    src, cfg = _source(tmp_path, MoeDims(), drop=("decoder.layers.1.mlp.router.weight",))
    with pytest.raises(ConversionError, match=r"router"):
        _plan(src, cfg)


def test_inconsistent_expert_counts(tmp_path: Path) -> None:
    d = MoeDims()
    tensors = mindformers_tensors(d, make_truth(d))
    p = "decoder.layers.2.mlp."
    tensors[p + "router.weight"] = tensors[p + "router.weight"][:2].clone()
    tensors[p + "router.expert_bias"] = tensors[p + "router.expert_bias"][:2].clone()
    src, cfg = _custom(tmp_path, tensors)
    with pytest.raises(ShapeError, match=r"MoE layers 1 and 2 differ"):
        _plan(src, cfg)


def test_grouped_tensor_of_wrong_size(tmp_path: Path) -> None:
    d = MoeDims()
    tensors = mindformers_tensors(d, make_truth(d))
    key = "decoder.layers.1.mlp.experts.weight1"
    tensors[key] = tensors[key][:-1].clone()
    src, cfg = _custom(tmp_path, tensors)
    with pytest.raises(ShapeError, match=r"weight1"):
        _plan(src, cfg)


def test_ep_not_dividing_experts(tmp_path: Path) -> None:
    src, cfg = _source(tmp_path, MoeDims())
    with pytest.raises(ParallelismError, match=r"--target-expert-parallel-size 3 does not divide the 4 experts"):
        _plan(src, cfg, expert_parallel=3)


def test_expert_tp_other_than_tp_refused(tmp_path: Path) -> None:
    src, cfg = _source(tmp_path, MoeDims())
    with pytest.raises(ParallelismError, match=r"expert-tensor-parallel-size 2 differs"):
        _plan(src, cfg, expert_tensor_parallel=2)


def test_topk_must_be_stated(tmp_path: Path) -> None:
    src, cfg = _source(tmp_path, MoeDims(), topk_in_yaml=False)
    with pytest.raises(UsageError, match=r"--moe-router-topk"):
        _plan(src, cfg)
    assert _plan(src, cfg, router_topk=2) is not None


def test_yaml_contradicting_tensors(tmp_path: Path) -> None:
    src, cfg = _source(tmp_path, MoeDims())
    cfg.write_text(cfg.read_text().replace("num_moe_experts: 4", "num_moe_experts: 8"))
    with pytest.raises(ShapeError, match=r"num_experts 8 but the tensors say 4"):
        _plan(src, cfg)


def test_shared_expert_gate_refused(tmp_path: Path) -> None:
    d = MoeDims()
    tensors = mindformers_tensors(d, make_truth(d))
    tensors["decoder.layers.1.mlp.shared_experts.shared_experts_gate.weight"] = torch.zeros(1, d.hidden)
    tensors["decoder.layers.2.mlp.shared_experts.shared_experts_gate.weight"] = torch.zeros(1, d.hidden)
    src, cfg = _custom(tmp_path, tensors)
    with pytest.raises(UsageError, match=r"shared-expert gate"):
        _plan(src, cfg)


def test_ep_on_a_dense_model_refused(tmp_path: Path) -> None:
    src, cfg = _source(tmp_path, MoeDims(layers=2, dense=2))
    with pytest.raises(ParallelismError, match=r"no experts"):
        _plan(src, cfg, expert_parallel=2)


@pytest.mark.parametrize("infix", ["local_experts.", ""])
def test_per_expert_source_names(tmp_path: Path, infix: str) -> None:
    d = MoeDims()
    truth = make_truth(d)
    src, cfg = write_mindformers(tmp_path, d, truth, experts_infix=infix)
    out = tmp_path / "out"
    run = convert("--load-dir", str(src), "--config", str(cfg), "--save-dir", str(out), "--tp", "2", "--ep", "2")
    assert run.returncode == 0, run.stderr
    got = load_rank_files(out)
    for name, tensors in expected_ranks(d, truth, 2, 2).items():
        for key, exp in tensors.items():
            assert torch.equal(got[name]["model"][key], exp.to(torch.bfloat16)), (name, key)


def test_per_expert_names_beyond_the_router_refused(tmp_path: Path) -> None:
    d = MoeDims()
    truth = make_truth(d)
    src, cfg = write_mindformers(tmp_path, d, truth, experts_infix="local_experts.")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["decoder.layers.1.mlp.experts.local_experts.4.linear_fc1.weight"] = torch.zeros(32, 32)
    tensors["decoder.layers.1.mlp.experts.local_experts.4.linear_fc2.weight"] = torch.zeros(32, 16)
    src, cfg = _custom(tmp_path, tensors)
    with pytest.raises(ShapeError, match=r"holds 10 routed-expert tensors but mlp.router.weight has 4"):
        _plan(src, cfg)


def test_file_names_with_pipeline_and_expert_parallelism(tmp_path: Path) -> None:
    src, cfg = _source(tmp_path, MoeDims(layers=4, dense=1))
    plan = build_plan(ConvertConfig(load_dir=src, config_yaml=cfg, tensor_parallel=2, pipeline_parallel=2,
                                    moe=MoeConfig(expert_parallel=2)))
    paths = [f.path.split("/")[1] for f in plan.files]  # type: ignore[attr-defined]
    assert paths == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for p in range(2) for e in range(2) for t in range(2)]
    last = plan.files[-1]  # type: ignore[attr-defined]
    keys = [e.key for e in last.entries()]
    assert "decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight" in keys  # global layer 3
    assert not any("local_experts.2." in k for k in keys)
    assert plan.args["moe_layer_freq"] == [0, 1, 1, 1]  # type: ignore[attr-defined]


def test_transformer_engine_names_keep_the_moe_pre_mlp_norm(tmp_path: Path) -> None:
    from ms2mg_converter.config import TransformerImpl

    src, cfg = _source(tmp_path, MoeDims())
    plan = build_plan(ConvertConfig(load_dir=src, config_yaml=cfg, transformer_impl=TransformerImpl.TRANSFORMER_ENGINE))
    keys = [e.key for e in plan.files[0].entries()]  # type: ignore[attr-defined]
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys  # dense: fused into fc1 (TE)
    assert "decoder.layers.0.pre_mlp_layernorm.weight" not in keys
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in keys  # MoE: TENorm of its own


def test_yaml_expert_bias_without_the_tensor_refused(tmp_path: Path) -> None:
    src, cfg = _source(tmp_path, MoeDims(bias=False))
    flag = "moe_router_enable_expert_bias"
    cfg.write_text(cfg.read_text().replace(f"{flag}: false", f"{flag}: true"))
    with pytest.raises(ShapeError, match=r"moe_router_enable_expert_bias True but the tensors say False"):
        _plan(src, cfg)


def test_torch_dist_output_refused_for_moe(tmp_path: Path) -> None:
    """torch_dist's sharded keys are written for dense models only: a MoE model is refused, not guessed."""
    from ms2mg_converter.config import CkptFormat

    src, cfg = _source(tmp_path, MoeDims())
    with pytest.raises(UsageError, match=r"torch_dist does not support MoE layers"):
        build_plan(ConvertConfig(load_dir=src, config_yaml=cfg, ckpt_format=CkptFormat.TORCH_DIST))
