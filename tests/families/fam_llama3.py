"""Llama-3 (3.1) in MindFormers' legacy llama-style naming, separate q/k/v and gate/up tensors.

Names (research/qwen2_5/convert_weight.py `name_replace` at 1fce088aa03c, the same HF -> MindFormers
mapping as mindformers/models/llama/convert_weight.py; `LlamaEmbedding`'s parameter is `embedding_weight`):
`model.tok_embeddings.embedding_weight`, `model.layers.N.attention_norm.weight`,
`model.layers.N.attention.{wq,wk,wv,wo}.weight`, `model.layers.N.ffn_norm.weight`,
`model.layers.N.feed_forward.{w1,w2,w3}.weight` (w1 gate, w3 up, w2 down), `model.norm_out.weight`,
`lm_head.weight`. GQA (`n_kv_heads`), untied head.
Dtypes and YAML follow research/llama3_1/llama3_1_8b/finetune_llama3_1_8b.yaml (0e67b43f701a):
`param_init_type: "float16"` (weights fp16), `embedding_init_type: "bfloat16"` (embedding bf16),
`type: LlamaConfig` with `num_heads`, `n_kv_heads`, `intermediate_size`, `rms_norm_eps: 1.0e-5`,
`theta: 500000`, `seq_length` and no `max_position_embedding`; `arch.type: LlamaForCausalLM`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.families.case import Case, Tensors
from tests.families.mfio import optimizer_state, run_sections, save_single, write_yaml
from tests.families.truth import Dims, Truth, make_truth

DIMS = Dims(dtype=torch.float16, embed_dtype=torch.bfloat16)


def legacy_common(t: Truth) -> Tensors:
    """Everything but the q/k/v and gate/up tensors, under legacy names (biases where the truth has them)."""
    out: Tensors = {"model.tok_embeddings.embedding_weight": t["embed"]}
    for i in range(t.dims.layers):
        p = f"model.layers.{i}."
        out[p + "attention_norm.weight"] = t.layer(i, "input_norm.weight")
        out[p + "attention.wo.weight"] = t.layer(i, "o.weight")
        out[p + "ffn_norm.weight"] = t.layer(i, "post_norm.weight")
        out[p + "feed_forward.w2.weight"] = t.layer(i, "down.weight")
        for name, src in (("attention.wo.bias", "o.bias"), ("feed_forward.w2.bias", "down.bias")):
            if t.layer_opt(i, src) is not None:
                out[p + name] = t.layer(i, src)
    out["model.norm_out.weight"] = t["norm.weight"]
    if not t.dims.tied:
        out["lm_head.weight"] = t["lm_head"]
    return out


def split_qkv_gate_up(t: Truth) -> Tensors:
    out: Tensors = {}
    for i in range(t.dims.layers):
        p = f"model.layers.{i}."
        for x in "qkv":
            out[f"{p}attention.w{x}.weight"] = t.layer(i, f"{x}.weight")
        out[p + "feed_forward.w1.weight"] = t.layer(i, "gate.weight")
        out[p + "feed_forward.w3.weight"] = t.layer(i, "up.weight")
    return out


def model_config(d: Dims, theta: bool = True, eps: bool = True) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "type": "LlamaConfig", "batch_size": 1, "seq_length": 8192, "hidden_size": d.hidden,
        "num_layers": d.layers, "num_heads": d.heads, "n_kv_heads": d.groups, "vocab_size": d.vocab,
        "intermediate_size": d.ffn, "rms_norm_eps": 1.0e-5, "bos_token_id": 128000, "eos_token_id": 128001,
        "compute_dtype": "bfloat16", "layernorm_compute_type": "float32", "softmax_compute_type": "float32",
        "rotary_dtype": "float32", "param_init_type": "float16", "embedding_init_type": "bfloat16",
        "use_past": False, "scaling_factor": 1.0, "theta": 500000, "extend_method": "None",
        "use_flash_attention": True, "offset": 0,
    }
    if not theta:
        del cfg["theta"]
    if not eps:
        del cfg["rms_norm_eps"]
    return cfg


STATED = {"rotary_base": 500000, "norm_epsilon": 1.0e-5, "seq_length": 8192, "num_query_groups": 2}


def build(root: Path, name: str = "llama3", optimizer: str = "adamw-moments", yaml: bool = True,
          theta: bool = True, seed: int = 5) -> Case:
    """yaml=False: no --config (the user passes flags); theta=False: a YAML without the rope base."""
    t = make_truth(DIMS, seed)
    weights = {**legacy_common(t), **split_qkv_gate_up(t)}
    opt = optimizer_state(optimizer, weights)
    src = root / name
    save_single(src, "llama3_1_8b_rank_0-1_1.safetensors", {**weights, **opt})
    config = None
    if yaml:
        doc = {**run_sections("llama3_1_8b", 1),
               "model": {"model_config": model_config(DIMS, theta), "arch": {"type": "LlamaForCausalLM"}}}
        config = write_yaml(root / f"{name}.yaml", doc)
    stated = dict(STATED) if yaml and theta else {}
    return Case(name, src, config, t, (), stated, frozenset(opt))
