"""DeepSeek-V3-style checkpoints (multi-latent attention + MoE: a first dense layer, shared experts, router
expert bias, sigmoid scores, group-limited routing) end to end: MindFormers' names in both MLA variants
(`mla_qkv_concat` True / False) and grouped experts -> every rank file at TP/EP/PP combos checked against the
independent truths split by this test's own rules; every rank strict-loaded into megatron-core 0.16.1's MLA +
MoE GPTModel (CPU); TP1/EP1 logits in fp32 against the plain-torch reference (tests/moe/deepseek.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.converter.megatron_consumer import load_rank_file
from tests.converter.test_mla import _expected_rank as mla_expected_rank
from tests.families.runner import convert, load_rank_files
from tests.moe import deepseek as ds
from tests.moe.fixture import _layer as moe_expected_layer

COMBOS = [(1, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2)]
"""(TP, EP, PP) converted for both MLA variants."""
Converted = dict[tuple[str, int, int, int], Path]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    out: Converted = {}
    for name, concat in ds.VARIANTS.items():
        src, cfg = ds.write_source(tmp_path_factory.mktemp(name), concat)
        for tp, ep, pp in COMBOS:
            save = src.parent / f"tp{tp}ep{ep}pp{pp}"
            run = convert("--load-dir", str(src), "--config", str(cfg), "--save-dir", str(save), "--tp", str(tp),
                          "--target-expert-parallel-size", str(ep), "--pp", str(pp), "--dtype", "fp32")
            assert run.returncode == 0, run.stderr[-3000:]
            out[(name, tp, ep, pp)] = save
    return out


def _rank_name(t: int, e: int, p: int, ep: int, pp: int) -> str:
    return f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")


def _expected_global(tp: int, ep: int, t: int, e: int, grouped: bool = False) -> dict[str, torch.Tensor]:
    """Global layer numbers: MLA attention and layer 0's dense MLP from the MLA truth, layers >= 1's MLP
    (router, expert bias, this EP rank's experts, shared expert) from the MoE truth."""
    mla, moe = ds.truths()
    out = mla_expected_rank(mla, True, tp, t, te=False)
    for i in range(ds.D.dense, ds.D.layers):
        mlp = f"decoder.layers.{i}.mlp."
        out = {k: v for k, v in out.items() if not k.startswith(mlp)}
        layer = moe_expected_layer(ds.D, moe, i, i, tp, t, ep, e, grouped)
        out |= {k: v for k, v in layer.items() if k.startswith(mlp)}
    return out


def _localise(tensors: dict[str, torch.Tensor], p: int, pp: int) -> dict[str, torch.Tensor]:
    """What pipeline stage p of pp holds, with its local layer numbers (an even split of the layers)."""
    per, out = ds.D.layers // pp, {}
    for k, v in tensors.items():
        if k.startswith("decoder.layers."):
            j, rest = k.removeprefix("decoder.layers.").split(".", 1)
            if int(j) // per == p:
                out[f"decoder.layers.{int(j) - p * per}.{rest}"] = v
        elif (k.startswith("embedding.") and p == 0) or (not k.startswith("embedding.") and p == pp - 1):
            out[k] = v
    return out


@pytest.mark.parametrize("name", list(ds.VARIANTS))
@pytest.mark.parametrize(("tp", "ep", "pp"), COMBOS)
def test_rank_files_match_truth(converted: Converted, name: str, tp: int, ep: int, pp: int) -> None:
    save = converted[(name, tp, ep, pp)]
    files = load_rank_files(save)
    assert sorted(files) == sorted(_rank_name(t, e, p, ep, pp) for t in range(tp) for e in range(ep)
                                   for p in range(pp))
    for t in range(tp):
        for e in range(ep):
            full = _expected_global(tp, ep, t, e)
            for p in range(pp):
                rank = _rank_name(t, e, p, ep, pp)
                want, model = _localise(full, p, pp), files[rank]["model"]
                weights = {k for k, v in model.items() if not k.endswith("_extra_state")}
                assert weights == set(want), (rank, sorted(weights ^ set(want)))
                for k, v in want.items():
                    assert torch.equal(model[k], v), (rank, k)
    args = files[_rank_name(0, 0, 0, ep, pp)]["args"]
    assert args.multi_latent_attention and (args.q_lora_rank, args.kv_lora_rank) == (ds.QL, ds.KL)
    assert (args.num_experts, args.moe_layer_freq, args.moe_router_topk) == (4, [0, 1, 1, 1], 2)
    assert (args.moe_router_num_groups, args.moe_router_group_topk) == (ds.GROUPS, ds.GROUP_TOPK)
    assert args.moe_router_score_function == "sigmoid" and args.moe_router_enable_expert_bias is True
    assert (args.moe_router_topk_scaling_factor, args.moe_shared_expert_intermediate_size) == (2.5, 24)
    assert (args.expert_model_parallel_size, args.pipeline_model_parallel_size) == (ep, pp)
    manifest = json.loads((save / "ms2mg-manifest.json").read_text())
    counters = [f"decoder.layers.{i}.mlp.router.{c}" for i in range(1, 4) for c in ("expert_load", "fi_accu")]
    assert sorted(manifest["dropped_keys"]) == sorted([*counters, "mtp.layers.0.enorm.weight"])


@pytest.mark.parametrize("name", list(ds.VARIANTS))
def test_every_rank_loads_strictly_into_megatron(converted: Converted, name: str) -> None:
    for tp, ep, pp in COMBOS:
        for t in range(tp):
            for e in range(ep):
                for p in range(pp):
                    rank = _rank_name(t, e, p, ep, pp)
                    sd = load_rank_file(converted[(name, tp, ep, pp)] / "iter_0000001" / rank / "model_optim_rng.pt")
                    model = ds.build_rank_model(sd["args"], t, e, p, torch.float32)
                    result = model.load_state_dict(sd["model"], strict=True)
                    assert not result.missing_keys and not result.unexpected_keys, (tp, ep, pp, rank, result)


@pytest.mark.parametrize("name", list(ds.VARIANTS))
def test_logits_match_reference(converted: Converted, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """TP1/EP1 fp32 logits within 1e-4 of the reference; the reference without the group limit is off by far
    more (so group-limited routing is exercised, not just carried)."""
    from tests.moe.consumer import logits

    sd = load_rank_file(converted[(name, 1, 1, 1)] / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")
    model = ds.build_rank_model(sd["args"], 0, 0, 0, torch.float32)
    model.load_state_dict(sd["model"], strict=True)
    ids = torch.randint(0, ds.VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    got = logits(model, ids)[0]
    want = ds.reference_logits(*ds.truths(), ids[0])
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()
    monkeypatch.setattr(ds, "GROUP_TOPK", ds.GROUPS)
    unlimited = ds.reference_logits(*ds.truths(), ids[0])
    assert (got - unlimited).abs().max().item() > 1e-2


def _convert(tmp_path: Path, concat: bool, *flags: str) -> Path:
    src, cfg = ds.write_source(tmp_path, concat)
    save = tmp_path / "out"
    run = convert("--load-dir", str(src), "--config", str(cfg), "--save-dir", str(save), "--dtype", "fp32", *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    return save


def test_grouped_gemm_keys_match_truth(tmp_path: Path) -> None:
    """`--moe-grouped-gemm` at TP2/EP2: TEGroupedMLP's `experts.linear_fc1.weight{k}` per local expert (no CPU
    build to load into; the tensors are checked against the truth)."""
    files = load_rank_files(_convert(tmp_path, True, "--moe-grouped-gemm", "--tp", "2",
                                     "--target-expert-parallel-size", "2"))
    for t in range(2):
        for e in range(2):
            want, model = _expected_global(2, 2, t, e, grouped=True), files[_rank_name(t, e, 0, 2, 1)]["model"]
            assert {k for k in model if not k.endswith("_extra_state")} == set(want)
            assert all(torch.equal(model[k], v) for k, v in want.items())
            assert "decoder.layers.1.mlp.experts.linear_fc1._extra_state" in model


def test_te_names_load_and_match_logits(tmp_path: Path) -> None:
    """`--saver-transformer-impl transformer_engine` at TP1/EP1: the dense layer's norm fused into fc1
    (`linear_fc1.layer_norm_weight`), the MoE layers' `pre_mlp_layernorm` kept separate, MLA's q/kv norms fused
    into the up projections; megatron-core's own TE->local pre-hook loads the file strictly and the logits
    match the reference."""
    from tests.converter.megatron_consumer import te_like, with_te_extra_state
    from tests.moe.consumer import logits

    save = _convert(tmp_path, True, "--saver-transformer-impl", "transformer_engine")
    sd = load_rank_file(save / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in sd["model"]
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in sd["model"]
    model = te_like(ds.build_rank_model(sd["args"], 0, 0, 0, torch.float32), "te-names")
    for layer in model.decoder.layers:
        with_te_extra_state(layer.input_layernorm)  # MLA under TE: a separate TENorm
    result = model.load_state_dict(sd["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    ids = torch.randint(0, ds.VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    got, want = logits(model, ids)[0], ds.reference_logits(*ds.truths(), ids[0])
    assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()
