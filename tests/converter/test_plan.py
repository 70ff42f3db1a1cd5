"""Architecture inference, cross-checks and the plan, from headers only (no tensor data is read)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ms2mg_converter.config import ConvertConfig, LayoutConfig, ModelOverrides, VocabConfig
from ms2mg_converter.demo.sample import SampleSpec, logical_weights, mindformers_tensors
from ms2mg_converter.errors import (
    MissingKeyError,
    ParallelismError,
    ShapeError,
    SourceError,
    UnknownKeyError,
    UsageError,
)
from ms2mg_converter.plan import ExtraEntry, TensorEntry, build_plan

HEADS = ModelOverrides(num_attention_heads=8, num_query_groups=4)
LAYOUTS = LayoutConfig(qkv="grouped", fc1="gate-up")


def make(tmp_path: Path, spec: SampleSpec | None = None, edit=None) -> Path:
    spec = spec or SampleSpec()
    tensors = mindformers_tensors(spec, logical_weights(spec))
    if edit:
        edit(tensors)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return path


def cfg(path: Path, **kw) -> ConvertConfig:
    kw.setdefault("model", HEADS)
    kw.setdefault("layouts", LAYOUTS)
    return ConvertConfig(load_dir=path, **kw)


def test_infers_the_architecture(tmp_path):
    spec = SampleSpec(num_layers=3, hidden_size=64, ffn_hidden_size=96, bias="all", tied=True, qk_layernorm=True)
    plan = build_plan(cfg(make(tmp_path, spec)))
    a = plan.arch
    assert (a.num_layers, a.hidden_size, a.ffn_hidden_size, a.kv_channels) == (3, 64, 96, 8)
    assert a.swiglu and a.add_bias_linear and a.add_qkv_bias and a.qk_layernorm
    assert not a.untie_embeddings_and_output_weights
    assert (a.normalization, a.position_embedding_type, a.source_vocab_rows) == ("RMSNorm", "rope", 1000)
    assert plan.args["group_query_attention"] is True and plan.args["num_query_groups"] == 4


def test_plan_layout_tp2_pp2(tmp_path):
    plan = build_plan(cfg(make(tmp_path, SampleSpec(tied=True)), tensor_parallel=2, pipeline_parallel=2,
                          vocab=VocabConfig(true_vocab_size=1000)))
    assert [f.path for f in plan.files] == [f"iter_0000001/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt"
                                            for p in range(2) for t in range(2)]
    first = [e.key for e in plan.files[0].entries()]
    last = {e.key: e for e in plan.files[3].entries()}
    assert first[0] == "embedding.word_embeddings.weight"
    assert "decoder.layers.1.mlp.linear_fc2.weight" in first and "decoder.layers.2.input_layernorm.weight" not in first
    out = last["output_layer.weight"]
    assert isinstance(out, TensorEntry) and out.source == "embedding.word_embeddings.weight"  # tied copy
    assert out.shape == (512, 64) and isinstance(last["output_layer._extra_state"], ExtraEntry)
    qkv = last["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert isinstance(qkv, TensorEntry) and qkv.source == "decoder.layers.2.self_attention.linear_qkv.weight"
    assert qkv.shape == ((8 + 2 * 4) * 8 // 2, 64)
    assert plan.total_groups == 2 * (1 + 2) + 2 * (2 + 1)


def test_plan_imports_no_torch_or_numpy(tmp_path):
    path = make(tmp_path)
    code = ("import sys; from pathlib import Path; from ms2mg_converter.plan import build_plan; "
            "from ms2mg_converter.config import *; "
            f"p = build_plan(ConvertConfig(load_dir=Path({str(path)!r}), model=ModelOverrides(num_attention_heads=8, "
            "num_query_groups=4), layouts=LayoutConfig(qkv='grouped', fc1='gate-up'))); "
            "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("model", "error", "message"), [
    (ModelOverrides(), UsageError, "pass --num-attention-heads"),
    (ModelOverrides(num_attention_heads=8), UsageError, "qkv rows imply 4"),
    (ModelOverrides(num_attention_heads=8, num_query_groups=2), ShapeError, "expected"),
    (ModelOverrides(num_attention_heads=8, num_query_groups=4, num_layers=5), ShapeError, "--num-layers 5 but"),
    (ModelOverrides(num_attention_heads=8, num_query_groups=4, hidden_size=128), ShapeError, "hidden-size 128"),
    (ModelOverrides(num_attention_heads=8, num_query_groups=4, swiglu=False), ShapeError, "--swiglu False"),
    (ModelOverrides(num_attention_heads=8, num_query_groups=4, padded_vocab_size=128000), ShapeError,
     "--padded-vocab-size 128000"),
    (ModelOverrides(num_attention_heads=8, num_query_groups=4, add_bias_linear=True), ShapeError, "add-bias"),
])
def test_contradictions_fail_before_reading_data(tmp_path, model, error, message):
    with pytest.raises(error, match=message):
        build_plan(cfg(make(tmp_path), model=model))


def test_layouts_are_required_only_where_they_matter(tmp_path):
    with pytest.raises(UsageError, match="--qkv-layout"):
        build_plan(cfg(make(tmp_path), layouts=LayoutConfig(fc1="gate-up")))
    with pytest.raises(UsageError, match="--fc1-layout"):
        build_plan(cfg(make(tmp_path), layouts=LayoutConfig(qkv="grouped")))
    one_group = make(tmp_path, SampleSpec(num_query_groups=1, swiglu=False))
    build_plan(cfg(one_group, model=ModelOverrides(num_attention_heads=8, num_query_groups=1),
                   layouts=LayoutConfig()))


def test_legacy_separate_qkv_needs_only_heads(tmp_path):
    path = make(tmp_path, SampleSpec(names="legacy", num_query_groups=2))
    plan = build_plan(cfg(path, model=ModelOverrides(num_attention_heads=8), layouts=LayoutConfig()))
    assert plan.arch.num_query_groups == 2 and plan.arch.family == "legacy"


def test_yaml_supplies_heads_and_layouts_flags_win(tmp_path):
    path = make(tmp_path, SampleSpec(fc1_layout="interleaved"))
    yaml = tmp_path / "model.yaml"
    yaml.write_text("model:\n  model_config:\n    num_heads: 8\n    n_kv_heads: 4\n    num_layers: 4\n"
                    "    use_contiguous_weight_layout_attention: false\n    use_interleaved_weight_layout_mlp: true\n")
    plan = build_plan(ConvertConfig(load_dir=path, config_yaml=yaml))
    assert plan.arch.fc1_layout == "interleaved" and plan.arch.qkv_layout == "grouped"
    plan = build_plan(ConvertConfig(load_dir=path, config_yaml=yaml, layouts=LayoutConfig(fc1="gate-up")))
    assert plan.arch.fc1_layout == "gate-up"
    yaml.write_text("model:\n  model_config:\n    num_heads: 8\n    n_kv_heads: 4\n    num_layers: 6\n")
    with pytest.raises(ShapeError, match="--num-layers 6"):
        build_plan(ConvertConfig(load_dir=path, config_yaml=yaml, layouts=LAYOUTS))


def drop(prefix: str):
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if k.startswith(prefix)]:
            del t[k]
    return edit


@pytest.mark.parametrize(("edit", "error", "message"), [
    (drop("decoder.layers.2."), MissingKeyError, r"layer\(s\) \[2\] are missing"),
    (drop("decoder.layers.1.mlp.linear_fc2"), MissingKeyError, "layer 1 and layer 0 hold different"),
    (drop("decoder.final_layernorm"), MissingKeyError, "decoder.final_layernorm"),
    (drop("embedding."), MissingKeyError, "embedding.word_embeddings.weight"),
    (lambda t: t.update({"decoder.layers.0.mystery.weight": torch.zeros(2)}), UnknownKeyError, "mystery"),
    (lambda t: t.update({"decoder.layers.0.mlp.linear_fc2.weight": torch.zeros(64, 100)}), ShapeError, "fc1"),
    (lambda t: t.update({"decoder.layers.3.self_attention.linear_proj.weight": torch.zeros(64, 32)}), ShapeError,
     "linear_proj"),
    (lambda t: t.update({f"decoder.layers.{i}.mlp.linear_fc2.bias": torch.zeros(64) for i in range(4)}), ShapeError,
     "some linear"),
    (lambda t: t.update({"decoder.layers.0.mlp.linear_fc2.bias": torch.zeros(64)}), MissingKeyError, "different"),
    (lambda t: t.update({"output_layer.weight": torch.zeros(999, 64)}), ShapeError, "output_layer"),
    (lambda t: t.update({"decoder.layers.0.input_layernorm.weight": torch.zeros(64, dtype=torch.int32)}), SourceError,
     "dtype I32"),
])
def test_damaged_checkpoints(tmp_path, edit, error, message):
    with pytest.raises(error, match=message):
        build_plan(cfg(make(tmp_path, edit=edit)))


def test_dropped_and_ignored_keys_are_listed(tmp_path):
    def edit(t):
        t["my_extra.weight"] = torch.zeros(3)

    path = make(tmp_path, SampleSpec(extra_keys=True), edit)
    plan = build_plan(cfg(path, ignore_keys=("my_extra.*",)))
    assert "global_step" in plan.dropped and any(k.startswith("adam_m.") for k in plan.dropped)
    assert plan.ignored == ("my_extra.weight",)


@pytest.mark.parametrize(("tp", "pp", "message"), [
    (8, 1, r"num_query_groups \(4\) is not divisible by tensor parallel size \(8\)"),
    (1, 3, r"num_layers \(4\) is not divisible by pipeline parallel size \(3\)"),
    (3, 1, r"num_attention_heads \(8\) is not divisible"),
])
def test_parallelism_errors_print_numbers(tmp_path, tp, pp, message):
    with pytest.raises(ParallelismError, match=message):
        build_plan(cfg(make(tmp_path), tensor_parallel=tp, pipeline_parallel=pp,
                       vocab=VocabConfig(true_vocab_size=1000)))


def test_vocab_rules(tmp_path):
    path = make(tmp_path)
    with pytest.raises(UsageError, match="not divisible by TP 3"):
        build_plan(cfg(path, tensor_parallel=3, model=ModelOverrides(num_attention_heads=6, num_query_groups=3)))
    with pytest.raises(UsageError, match="larger than the 1000 rows"):
        build_plan(cfg(path, vocab=VocabConfig(true_vocab_size=1001)))
    plan = build_plan(cfg(path, tensor_parallel=2, vocab=VocabConfig(true_vocab_size=1000,
                                                                     make_vocab_size_divisible_by=64)))
    assert plan.arch.padded_vocab_size == 1024
