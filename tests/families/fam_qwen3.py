"""Qwen3 in MindFormers' mcore (`mindformers.parallel_core`) naming, two layout generations.

Names = Megatron-core names (target-format.md §3.3; mindformers/models/qwen3/utils.py maps HF names to
them; training models use `auto_prefix=False`, so no `model.` prefix): `embedding.word_embeddings.weight`,
`decoder.layers.N.{input_layernorm, self_attention.linear_qkv, self_attention.q_layernorm,
self_attention.k_layernorm, self_attention.linear_proj, pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}`,
`decoder.final_layernorm.weight`, `output_layer.weight`. Stored fp32 (`params_dtype: "float32"`).

- "r1.6" (r1.6.0 / dev 2025-07): `use_contiguous_weight_layout` defaults True -> `SelfAttentionContiguous`,
  `linear_qkv` = [Q;K;V]; `MLP` (mindformers/parallel_core/training_graph/transformer/mlp.py at commit
  099486867e49) splits `linear_fc1` into [gate; up] halves. The user passes `--qkv-layout contiguous
  --fc1-layout gate-up`. Uncertain: whether r1.6 Qwen3 YAMLs spelled the layout flag; this fixture's YAML
  does not (the default is what a user who never set it trained with). Source TP 1 (`model_parallel: 1`).
- "r1.7" (r1.7.0, r1.8.0, master): `use_contiguous_weight_layout_attention: False` (stated in
  configs/qwen3/pretrain_qwen3_32b_4k.yaml at 477621fde7ff) -> Megatron's grouped `linear_qkv`;
  `use_interleaved_weight_layout_mlp` defaults True -> `MLPInterleaved` (reshape (seq, bs, ffn, 2), x0 the
  gate): fc1 rows gate, up, gate, up. The YAML does not state the fc1 flag, so the user passes
  `--fc1-layout interleaved` ("r1.7"), or the YAML states both flags ("r1.7-yaml"). Both layouts are
  TP-invariant, so the YAML keeps `model_parallel: 2`. Written as HF-style shards with
  model.safetensors.index.json (uncertain: the exact file names MindFormers' merged save uses).
YAML keys follow pretrain_qwen3_32b_4k.yaml: HF-style `num_hidden_layers`, `num_attention_heads`,
`num_key_value_heads`, `head_dim`, `intermediate_size`, `rms_norm_eps`, `rope_theta`,
`max_position_embeddings`, `seq_length`, `tie_word_embeddings`, plus `qk_layernorm`, `qkv_concat`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.families import mflayout
from tests.families.case import Case, Tensors
from tests.families.mfio import optimizer_state, run_sections, save_sharded, save_single, write_yaml
from tests.families.truth import Dims, Truth, make_truth

DIMS = Dims(head_dim=16, qk_norm=True)
"""kv_channels 16 != hidden/heads 8, as in real Qwen3 (e.g. 32B: 5120 hidden, 64 heads, head_dim 128)."""

Fuse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Glu = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _norm(out: Tensors, t: Truth, src: str, dst: str, names: tuple[str, str]) -> None:
    out[f"{dst}.{names[0]}"] = t[f"{src}.weight"]
    if t.dims.layernorm:
        out[f"{dst}.{names[1]}"] = t[f"{src}.bias"]


def _mcore_layer(out: Tensors, t: Truth, i: int, qkv: Fuse, glu: Glu, norm: tuple[str, str]) -> None:
    p, a, x = f"decoder.layers.{i}.", f"decoder.layers.{i}.self_attention.", t.layer
    _norm(out, t, f"{i}.input_norm", p + "input_layernorm", norm)
    out[a + "linear_qkv.weight"] = qkv(x(i, "q.weight"), x(i, "k.weight"), x(i, "v.weight"))
    if t.layer_opt(i, "q.bias") is not None:
        out[a + "linear_qkv.bias"] = qkv(x(i, "q.bias"), x(i, "k.bias"), x(i, "v.bias"))
    out[a + "linear_proj.weight"] = x(i, "o.weight")
    if t.layer_opt(i, "o.bias") is not None:
        out[a + "linear_proj.bias"] = x(i, "o.bias")
    if t.dims.qk_norm:
        out[a + "q_layernorm.weight"], out[a + "k_layernorm.weight"] = x(i, "q_norm.weight"), x(i, "k_norm.weight")
    _norm(out, t, f"{i}.post_norm", p + "pre_mlp_layernorm", norm)
    gated = t.dims.swiglu
    out[p + "mlp.linear_fc1.weight"] = glu(x(i, "gate.weight"), x(i, "up.weight")) if gated else x(i, "up.weight")
    if t.layer_opt(i, "up.bias") is not None:
        out[p + "mlp.linear_fc1.bias"] = glu(x(i, "gate.bias"), x(i, "up.bias")) if gated else x(i, "up.bias")
    out[p + "mlp.linear_fc2.weight"] = x(i, "down.weight")
    if t.layer_opt(i, "down.bias") is not None:
        out[p + "mlp.linear_fc2.bias"] = x(i, "down.bias")


def mcore_tensors(t: Truth, qkv: Fuse, glu: Glu, norm: tuple[str, str] = ("weight", "bias")) -> Tensors:
    """The truth under MindFormers mcore names, fused with the given row orders."""
    out: Tensors = {"embedding.word_embeddings.weight": t["embed"]}
    for i in range(t.dims.layers):
        _mcore_layer(out, t, i, qkv, glu, norm)
    _norm(out, t, "norm", "decoder.final_layernorm", norm)
    if not t.dims.tied:
        out["output_layer.weight"] = t["lm_head"]
    return out


def _model_config(d: Dims, version: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "vocab_size": d.vocab, "hidden_size": d.hidden, "intermediate_size": d.ffn,
        "num_hidden_layers": d.layers, "num_attention_heads": d.heads, "num_key_value_heads": d.groups,
        "head_dim": d.head_dim, "hidden_act": "swiglu", "max_position_embeddings": 4096, "seq_length": 4096,
        "rms_norm_eps": 1.0e-6, "tie_word_embeddings": False, "rope_theta": 1000000.0, "attention_bias": False,
        "add_bias_linear": False, "untie_embeddings_and_output_weights": True, "position_embedding_type": "rope",
        "qk_layernorm": True, "qkv_concat": True, "params_dtype": "float32", "compute_dtype": "bfloat16",
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
    }
    if version.startswith("r1.7"):
        cfg["use_contiguous_weight_layout_attention"] = False
    if version == "r1.7-yaml":
        cfg["use_interleaved_weight_layout_mlp"] = True
    return cfg


STATED = {"rotary_base": 1000000, "norm_epsilon": 1.0e-6, "max_position_embeddings": 4096, "seq_length": 4096,
          "kv_channels": 16, "num_query_groups": 2, "qk_layernorm": True}


def build(root: Path, version: str, seed: int = 3) -> Case:
    """version: "r1.6", "r1.7" (fc1 layout as a flag) or "r1.7-yaml" (both layouts in the YAML)."""
    t = make_truth(DIMS, seed)
    if version == "r1.6":
        weights = mcore_tensors(t, mflayout.qkv_contiguous, mflayout.gate_up)
        flags: tuple[str, ...] = ("--qkv-layout", "contiguous", "--fc1-layout", "gate-up")
    else:
        weights = mcore_tensors(t, lambda q, k, v: mflayout.qkv_grouped(q, k, v, DIMS.groups),
                                mflayout.gate_up_interleaved)
        flags = ("--fc1-layout", "interleaved") if version == "r1.7" else ()
    opt = optimizer_state("adamw-moments", weights)
    src = root / f"qwen3-{version}"
    if version == "r1.6":
        save_single(src, "qwen3_rank_0-1_1.safetensors", {**weights, **opt})
    else:
        save_sharded(src, {**weights, **opt}, shards=2)
    doc = {**run_sections("Qwen3", 1 if version == "r1.6" else 2), "use_legacy": False,
           "model": {"model_config": _model_config(DIMS, version)}}
    yaml_path = write_yaml(root / f"qwen3-{version}.yaml", doc)
    return Case(f"qwen3-{version}", src, yaml_path, t, flags, dict(STATED), frozenset(opt))
