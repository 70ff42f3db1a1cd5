"""The sample checkpoints: deterministic, named per family, laid out as asked, in the asked dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ms2mg_converter.demo.sample import SampleSpec, build_sample, logical_weights, mindformers_tensors


def _read_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_deterministic_from_seed(tmp_path: Path) -> None:
    spec = SampleSpec(bias="all")
    build_sample(spec, tmp_path / "a")
    build_sample(spec, tmp_path / "b")
    a, b = (tmp_path / x / "model.safetensors" for x in "ab")
    assert a.read_bytes() == b.read_bytes()
    other = logical_weights(SampleSpec(bias="all", seed=1))
    same = logical_weights(spec)
    assert same.keys() == other.keys()
    assert not torch.equal(same["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_logical_weights_are_well_conditioned() -> None:
    w = logical_weights(SampleSpec(normalization="LayerNorm", bias="all"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in w.values())
    assert 0.9 < w["model.layers.0.input_layernorm.weight"].mean() < 1.1
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert 0.5 / 8 < q.std() < 2 / 8  # 1/sqrt(hidden=64)


def test_mcore_names_and_shapes() -> None:
    spec = SampleSpec(bias="all", qk_layernorm=True, kv_channels=16, normalization="LayerNorm",
                      position_embedding_type="learned_absolute")
    t = mindformers_tensors(spec, logical_weights(spec))
    nh, ng, d, h, f = 8, 4, 16, 64, 128
    p = "decoder.layers.3."
    assert t["embedding.word_embeddings.weight"].shape == (1000, h)
    assert t["embedding.position_embeddings.weight"].shape == (128, h)
    assert t[p + "self_attention.linear_qkv.weight"].shape == ((nh + 2 * ng) * d, h)
    assert t[p + "self_attention.linear_qkv.bias"].shape == ((nh + 2 * ng) * d,)
    assert t[p + "self_attention.linear_proj.weight"].shape == (h, nh * d)
    assert t[p + "self_attention.q_layernorm.weight"].shape == (d,)
    assert t[p + "self_attention.k_layernorm.bias"].shape == (d,)
    assert t[p + "mlp.linear_fc1.weight"].shape == (2 * f, h)
    assert t[p + "mlp.linear_fc2.bias"].shape == (h,)
    assert t[p + "pre_mlp_layernorm.bias"].shape == (h,)
    final = {"decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight"}
    assert final <= t.keys()
    assert not any(k.startswith("model.") for k in t)


def test_tied_qkv_only_bias_rmsnorm() -> None:
    spec = SampleSpec(tied=True, bias="qkv")
    t = mindformers_tensors(spec, logical_weights(spec))
    assert "output_layer.weight" not in t
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in t
    assert not any(k.endswith("bias") and "linear_qkv" not in k for k in t)


@pytest.mark.parametrize("fused", [False, True])
def test_legacy_names(fused: bool) -> None:
    spec = SampleSpec(names="legacy", legacy_fused=fused, bias="qkv")
    t = mindformers_tensors(spec, logical_weights(spec))
    p = "model.layers.1."
    expected = {"model.tok_embeddings.embedding_weight", "model.norm_out.weight", "lm_head.weight",
                p + "attention_norm.weight", p + "ffn_norm.weight", p + "attention.wo.weight",
                p + "feed_forward.w2.weight"}
    if fused:
        expected |= {p + "attention.w_qkv.weight", p + "attention.w_qkv.bias",
                     p + "feed_forward.w_gate_hidden.weight"}
    else:
        expected |= {p + f"attention.w{x}.{k}" for x in "qkv" for k in ("weight", "bias")}
        expected |= {p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"}
    assert expected <= t.keys()
    assert not any(k.startswith(("decoder.", "embedding.")) for k in t)
    assert len([k for k in t if k.startswith(p)]) == len([k for k in expected if k.startswith(p)])


def test_legacy_fused_is_concat_of_separate() -> None:
    """r1.3's order ([Q;K;V], [gate; up]); r1.4+ packs per query group and interleaves, as the layouts say."""
    w = logical_weights(SampleSpec())
    fused = mindformers_tensors(SampleSpec(names="legacy", legacy_fused=True, qkv_layout="contiguous"), w)
    sep = mindformers_tensors(SampleSpec(names="legacy"), w)
    p = "model.layers.0."
    assert torch.equal(fused[p + "attention.w_qkv.weight"],
                       torch.cat([sep[p + f"attention.w{x}.weight"] for x in "qkv"]))
    assert torch.equal(fused[p + "feed_forward.w_gate_hidden.weight"],
                       torch.cat([sep[p + "feed_forward.w1.weight"], sep[p + "feed_forward.w3.weight"]]))


def test_layouts_really_differ() -> None:
    w = logical_weights(SampleSpec(bias="all"))
    base = mindformers_tensors(SampleSpec(bias="all"), w)
    contiguous = mindformers_tensors(SampleSpec(bias="all", qkv_layout="contiguous"), w)
    interleaved = mindformers_tensors(SampleSpec(bias="all", fc1_layout="interleaved"), w)
    qkv, fc1 = "decoder.layers.0.self_attention.linear_qkv.", "decoder.layers.0.mlp.linear_fc1."
    d, per_group = 8, (8 // 4 + 2) * 8
    q, k, v = (w[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    g, u = w["model.layers.0.mlp.gate_proj.weight"], w["model.layers.0.mlp.up_proj.weight"]
    for kind in ("weight", "bias"):
        assert not torch.equal(base[qkv + kind], contiguous[qkv + kind])
        assert not torch.equal(base[fc1 + kind], interleaved[fc1 + kind])
        assert torch.equal(base[qkv + kind].sort(0).values, contiguous[qkv + kind].sort(0).values)
    grouped = base[qkv + "weight"]
    assert torch.equal(grouped[:2 * d], q[:2 * d])  # group 0: Q heads 0, 1
    assert torch.equal(grouped[2 * d:3 * d], k[:d])  # then K head 0
    assert torch.equal(grouped[3 * d:per_group], v[:d])  # then V head 0
    assert torch.equal(grouped[per_group:per_group + 2 * d], q[2 * d:4 * d])
    assert torch.equal(contiguous[qkv + "weight"], torch.cat((q, k, v)))
    assert torch.equal(base[fc1 + "weight"], torch.cat((g, u)))
    assert torch.equal(interleaved[fc1 + "weight"][0::2], g)
    assert torch.equal(interleaved[fc1 + "weight"][1::2], u)


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                                     ("fp16", torch.float16)])
def test_dtypes(tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    spec = SampleSpec(dtype=dtype)  # type: ignore[arg-type]
    weights = build_sample(spec, tmp_path)
    t = _read_dir(tmp_path)
    assert {v.dtype for v in t.values()} == {torch_dtype}
    expected = weights["model.embed_tokens.weight"].to(torch_dtype)
    assert torch.equal(t["embedding.word_embeddings.weight"], expected)


def test_files_index_and_extra_keys(tmp_path: Path) -> None:
    spec = SampleSpec(names="legacy", extra_keys=True, files=3, index_json=True)
    build_sample(spec, tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    on_disk = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            on_disk.update(dict.fromkeys(h.keys(), f.name))
    assert index["weight_map"] == on_disk
    keys = set(on_disk)
    for k in ("global_step", "epoch_num", "step_num", "loss_scale", "scale_sense",
              "adam_m.model.norm_out.weight", "adam_v.lm_head.weight"):
        assert k in keys
    assert any("dropout" in k for k in keys)
    model_keys = set(mindformers_tensors(SampleSpec(names="legacy"), logical_weights(spec)))
    assert {k for k in keys if k.startswith("adam_m.")} == {f"adam_m.{k}" for k in model_keys}


def test_invalid_specs() -> None:
    with pytest.raises(ValueError, match="num_query_groups"):
        SampleSpec(num_query_groups=3)
    with pytest.raises(ValueError, match="legacy"):
        SampleSpec(names="legacy", qk_layernorm=True)
    with pytest.raises(ValueError, match="legacy_fused"):
        SampleSpec(legacy_fused=True)
