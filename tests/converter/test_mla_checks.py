"""MLA input checks: bad input refused with clear errors, RoPE facts from flags and YAML, parallel rules,
and `ms2mg verify` on MLA tensors (fixtures: tests/converter/mla_fixture.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.converter.mla_fixture import (
    NH,
    mindformers_tensors,
    mla_flags,
    run_convert,
    sources,
    truth_tensors,
)

__all__ = ["sources"]  # the module fixture, used by name


def _plan(src: Path, tp: int = 1, **model: object):
    from ms2mg_converter.config import ConvertConfig, Fc1Layout, LayoutConfig, ModelOverrides
    from ms2mg_converter.plan import build_plan

    base: dict[str, object] = {"num_attention_heads": NH, "rope_type": "rope"}
    values = {k: v for k, v in (base | model).items() if v is not None}
    return build_plan(ConvertConfig(load_dir=src, tensor_parallel=tp, model=ModelOverrides(**values),
                                    layouts=LayoutConfig(fc1=Fc1Layout.GATE_UP)))


@pytest.mark.parametrize(("name", "model", "error", "message"), [
    ("concat", {"num_attention_heads": None}, "UsageError", "attention heads of a multi-latent"),
    ("concat", {"rope_type": None}, "UsageError", "--rope-type"),
    ("concat-noq", {}, "UsageError", "--qk-pos-emb-head-dim"),
    ("concat", {"q_lora_rank": 99}, "ShapeError", "--q-lora-rank 99 but the tensors say 24"),
    ("split", {"v_head_dim": 7}, "ShapeError", "--v-head-dim 7 but the tensors say 6"),
    ("split", {"num_attention_heads": 5}, "ShapeError", "not a multiple of the 5 attention heads"),
])
def test_bad_mla_input_is_refused_clearly(sources: dict, name: str, model: dict, error: str, message: str) -> None:
    from ms2mg_converter import errors

    with pytest.raises(getattr(errors, error), match=message.replace("-", r"\-")):
        _plan(sources[name][0], **model)


def test_yarn_facts_defaulted_and_stored(sources: dict) -> None:
    plan = _plan(sources["split"][0], rope_type="yarn", rotary_scaling_factor=4.0)
    assert {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings"} <= set(
        plan.arch.defaulted)
    assert "rotary_scaling_factor" not in plan.arch.defaulted
    assert (plan.args["rope_type"], plan.args["rotary_scaling_factor"], plan.args["beta_fast"]) == ("yarn", 4.0, 32.0)
    from ms2mg_converter.model.facts import describe_defaulted

    assert "beta_fast=32.0" in describe_defaulted(plan.arch)


def test_mla_split_must_divide() -> None:
    """Local spec: the down projections are split by rows, so q_lora_rank and kv_lora_rank + qk_pos_emb_head_dim
    must divide by TP; the TE spec replicates them (no rule)."""
    from ms2mg_converter.model.mla import MlaDims, mla_parallel_problems

    dims = MlaDims(heads=8, q_lora_rank=20, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6,
                   rope_type="rope", rotary_scaling_factor=40, original_max_position_embeddings=4096, beta_fast=32,
                   beta_slow=1, mscale=1, mscale_all_dim=0)
    problems = mla_parallel_problems(dims, 8, down_split=True)
    assert len(problems) == 2 and "kv_lora_rank + qk_pos_emb_head_dim (20)" in problems[0]
    assert "q_lora_rank (20)" in problems[1]
    assert mla_parallel_problems(dims, 8, down_split=False) == []
    assert mla_parallel_problems(dims, 4, down_split=True) == []


def test_layer_missing_kv_layernorm(tmp_path: Path) -> None:
    from ms2mg_converter import errors

    mf = mindformers_tensors(truth_tensors(True), True, False)
    del mf["decoder.layers.2.self_attention.kv_layernorm.weight"]
    save_file(mf, str(tmp_path / "model.safetensors"))
    with pytest.raises(errors.MissingKeyError, match="layer 2"):
        _plan(tmp_path)


def test_yaml_states_mla_facts(sources: dict, tmp_path: Path) -> None:
    """A MindFormers mcore YAML (`multi_latent_attention: True`, `position_embedding_type: yarn`,
    `rotary_scaling_factor`) and an HF-style `rope_scaling` block both state the RoPE facts."""
    from ms2mg_converter.config import ConvertConfig, Fc1Layout, LayoutConfig
    from ms2mg_converter.plan import build_plan

    mcore = tmp_path / "mcore.yaml"
    mcore.write_text("model:\n  model_config:\n    num_attention_heads: 4\n    multi_latent_attention: True\n"
                     "    position_embedding_type: \"yarn\"\n    rotary_scaling_factor: 64.0\n    q_lora_rank: 24\n"
                     "    qk_rope_head_dim: 4\n    mscale: 0.707\n", encoding="utf-8")
    hf = tmp_path / "hf.yaml"
    hf.write_text("model:\n  model_config:\n    num_attention_heads: 4\n    rope_scaling:\n      type: yarn\n"
                  "      factor: 40\n      beta_fast: 32\n      beta_slow: 1\n      mscale: 1.0\n"
                  "      mscale_all_dim: 1.0\n      original_max_position_embeddings: 4096\n", encoding="utf-8")
    for yaml_file, factor, defaulted in ((mcore, 64.0, True), (hf, 40.0, False)):
        plan = build_plan(ConvertConfig(load_dir=sources["concat"][0], config_yaml=yaml_file,
                                        layouts=LayoutConfig(fc1=Fc1Layout.GATE_UP)))
        assert plan.arch.mla is not None and plan.arch.mla.rope_type == "yarn"
        assert plan.arch.mla.rotary_scaling_factor == factor
        assert ("beta_fast" in plan.arch.defaulted) is defaulted


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ms2mg_converter verify ARGS`."""
    return subprocess.run([sys.executable, "-m", "ms2mg_converter", "verify", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_verify_rebuilds_mla_tensors_from_the_fused_source(sources: dict, tmp_path: Path) -> None:
    """`ms2mg verify` rebuilds the split of the fused linear_qkv from the source and finds a changed value."""
    from ms2mg_converter.verify.ckptfile import peek
    src, _ = sources["concat"]
    save = tmp_path / "out"
    run_convert(src, save, *mla_flags("concat"), "--tp", "2")
    assert verify("--load-dir", str(src), "--save-dir", str(save)).returncode == 0
    path = save / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    rf = peek(path)
    stored = rf.content["model"]["decoder.layers.1.self_attention.linear_kv_down_proj.weight"]
    start, _ = rf.data_offsets[f"{rf.prefix}/{stored.record}"]
    raw = bytearray(path.read_bytes())
    raw[start + 4] ^= 0x40
    path.write_bytes(bytes(raw))
    done = verify("--load-dir", str(src), "--save-dir", str(save))
    assert done.returncode == 5
    assert "MISMATCH" in done.stdout and "decoder.layers.1.self_attention.linear_kv_down_proj.weight" in done.stdout


def test_torch_dist_plan_holds_te_and_local_norm_names(sources: dict) -> None:
    """torch_dist for MLA: the TE names and the local spec's own norm names, from the same source tensor
    (loads: test_mla_torch_dist)."""
    from ms2mg_converter.config import CkptFormat, ConvertConfig, Fc1Layout, LayoutConfig, ModelOverrides
    from ms2mg_converter.plan import build_plan

    cfg = ConvertConfig(load_dir=sources["concat"][0], ckpt_format=CkptFormat.TORCH_DIST,
                        model=ModelOverrides(num_attention_heads=NH, rope_type="rope"),
                        layouts=LayoutConfig(fc1=Fc1Layout.GATE_UP))
    (fp,) = build_plan(cfg).files
    keys = [e.key for e in fp.entries()]
    layer = "decoder.layers.1."
    a = layer + "self_attention."
    for te, local in ((f"{a}linear_q_up_proj.layer_norm_weight", f"{a}q_layernorm.weight"),
                      (f"{a}linear_kv_up_proj.layer_norm_weight", f"{a}kv_layernorm.weight"),
                      (f"{layer}mlp.linear_fc1.layer_norm_weight", f"{layer}pre_mlp_layernorm.weight")):
        assert keys.count(te) == 1 and keys.count(local) == 1, (te, local)
