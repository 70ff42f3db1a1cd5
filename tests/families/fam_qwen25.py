"""Qwen2.5 in MindFormers' legacy llama-style naming with `qkv_concat: True` (research/qwen2_5).

Names: as fam_llama3, but q/k/v are one `model.layers.N.attention.w_qkv.{weight,bias}` and gate/up one
`model.layers.N.feed_forward.w_gate_hidden.weight` (research/qwen2_5/convert_weight.py at 1fce088aa03c,
`convert_qkv_concat_weight`: w_qkv weight and bias, w_gate_hidden weight only; no other bias, Qwen2 style).
Two row orders:
- "r1.3": mindformers/models/llama/llama_transformer.py of r1.3 splits w_qkv with `SplitWithSize`
  (hidden, kv_dim, kv_dim) and llama_layer.py splits w_gate_hidden (hidden_dim, hidden_dim): [Q;K;V] and
  [gate; up]. Both splits carry `skip_redistribution` and run on each model-parallel rank's slice, so a
  checkpoint trained with `parallel_config.model_parallel: t` holds [Q_r;K_r;V_r] and [G_r;U_r] per rank r
  (`source_tp`). Uncertain: which exact release boundary (the issue says r1.4.0-beta2) changed this.
- "r1.4" (r1.4.0-beta2 .. master): w_qkv per query group (convert_utils.py `qkv_concat_hf2mg`, read back
  with reshape (bs, seq, n_kv_head, (n_rep + 2) * head_dim)), w_gate_hidden rows gate/up interleaved one
  row at a time (convert_utils.py `ffn_concat_hf2mg`, read back with reshape (bs, seq, hidden_dim, 2)).
  Both are TP-invariant.
Stored bf16 (convert_weight.py defaults `--dtype bf16`). YAML follows research/qwen2_5/
finetune_qwen2_5_7b_8k.yaml (268b63fad89e: LlamaConfig, `num_heads`, `n_kv_heads`, `qkv_has_bias: True`,
`rms_norm_eps: 1.0e-6`, `theta: 1000000.0`, `max_position_embedding: 131072`, `rotary_emb_base: 1000000`,
`qkv_concat: false`) with `qkv_concat: True` as in research/qwen2_5/finetune_qwen2.5_72B_32K.yaml
(55d49a52ad5d). The YAML cannot tell r1.3 from r1.4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.families import mflayout
from tests.families.case import Case, Tensors
from tests.families.fam_llama3 import legacy_common
from tests.families.mfio import optimizer_state, run_sections, save_single, write_yaml
from tests.families.truth import Dims, Truth, make_truth

DIMS = Dims(qkv_bias=True, dtype=torch.bfloat16)


def fused(t: Truth, version: str, source_tp: int = 1) -> Tensors:
    out: Tensors = {}
    for i in range(t.dims.layers):
        p, x = f"model.layers.{i}.", t.layer
        for kind in ("weight", "bias"):
            q, k, v = (x(i, f"{n}.{kind}") for n in "qkv")
            out[f"{p}attention.w_qkv.{kind}"] = (mflayout.qkv_contiguous(q, k, v, source_tp) if version == "r1.3"
                                                 else mflayout.qkv_grouped(q, k, v, t.dims.groups))
        gate, up = x(i, "gate.weight"), x(i, "up.weight")
        out[p + "feed_forward.w_gate_hidden.weight"] = (mflayout.gate_up(gate, up, source_tp) if version == "r1.3"
                                                        else mflayout.gate_up_interleaved(gate, up))
    return out


def model_config(d: Dims) -> dict[str, Any]:
    return {
        "type": "LlamaConfig", "batch_size": 1, "seq_length": 8192, "hidden_size": d.hidden,
        "num_layers": d.layers, "num_heads": d.heads, "n_kv_heads": d.groups, "vocab_size": d.vocab,
        "intermediate_size": d.ffn, "qkv_has_bias": True, "rms_norm_eps": 1.0e-6, "theta": 1000000.0,
        "max_position_embedding": 131072, "emb_dropout_prob": 0.0, "compute_dtype": "bfloat16",
        "layernorm_compute_type": "float32", "softmax_compute_type": "float32", "rotary_dtype": "float32",
        "param_init_type": "float32", "use_past": False, "use_flash_attention": True, "offset": 0,
        "extend_method": "None", "fine_grain_interleave": 1, "qkv_concat": True, "rotary_pct": 1.0,
        "rotary_emb_base": 1000000,
    }


STATED = {"rotary_base": 1000000, "norm_epsilon": 1.0e-6, "max_position_embeddings": 131072,
          "num_query_groups": 2, "add_qkv_bias": True, "add_bias_linear": False}
FLAGS = {"r1.3": ("--qkv-layout", "contiguous", "--fc1-layout", "gate-up"),
         "r1.4": ("--qkv-layout", "grouped", "--fc1-layout", "interleaved")}


def build(root: Path, version: str, source_tp: int = 1, yaml_model_parallel: int = 1, seed: int = 7) -> Case:
    """A Qwen2.5 checkpoint of MindFormers `version` ("r1.3" or "r1.4") trained at `source_tp`."""
    t = make_truth(DIMS, seed)
    weights = {**legacy_common(t), **fused(t, version, source_tp)}
    opt = optimizer_state("adamw-moments", weights)
    name = f"qwen2.5-{version}-srctp{source_tp}-mp{yaml_model_parallel}"
    save_single(root / name, "qwen2_rank_0-1_1.safetensors", {**weights, **opt})
    doc = {**run_sections("qwen2_5_7b", yaml_model_parallel),
           "model": {"model_config": model_config(DIMS), "arch": {"type": "LlamaForCausalLM"}}}
    config = write_yaml(root / f"{name}.yaml", doc)
    return Case(name, root / name, config, t, FLAGS[version], dict(STATED), frozenset(opt))
