"""GLM-4 in MindFormers' ChatGLM2 naming (mindformers/models/glm2, configs/glm4).

Names (glm2.py at 07067d322b87: `ChatGLM2ForConditionalGeneration.transformer` = `ChatGLM2Model` with
`embedding` = `LlamaEmbedding` (parameter `embedding_weight`), `encoder` = `ChatGLM2Transformer`,
`output_layer` = `Linear`; glm2_transformer.py at 000a5cff949b: `layers.N.{input_layernorm,
self_attention.query_key_value, self_attention.dense, post_attention_layernorm, mlp}`, `final_layernorm`;
glm2_modules.py: `ChatGLM2RMSNorm.weight`, `ChatGLM2MLP.{dense_h_to_4h, dense_4h_to_h}`):
`transformer.embedding.embedding_weight`, `transformer.encoder.layers.N.input_layernorm.weight`,
`...self_attention.query_key_value.{weight,bias}`, `...self_attention.dense.weight`,
`...post_attention_layernorm.weight`, `...mlp.dense_h_to_4h.weight`, `...mlp.dense_4h_to_h.weight`,
`transformer.encoder.final_layernorm.weight`, `transformer.output_layer.weight`.
Layouts: `query_key_value` (bias when `add_qkv_bias`) is split (nh*d, ng*d, ng*d): [Q;K;V];
`dense_h_to_4h` is split in two halves, silu on the first: [gate; up]. RoPE: `apply_rotary_pos_emb`
rotates only the first `kv_channels // 2` dims of each head, as adjacent pairs (reshape (..., rot_dim // 2,
2)); frequencies `base ** (arange(0, dim, 2) / dim)` with dim = rotary_dim // 2 and base = 10000 *
`rope_ratio` (glm2_modules.py `precompute_rotary_emb_cache` / `RopeCache`). In Megatron terms:
rotary_percent 0.5, rotary_interleaved True, rotary_base 10000 * rope_ratio; q/k rows need no permutation.
Uncertain: older glm2 convert_weight.py (0ba2cd668da8) renamed the table `embedding_table`; a newer
glm2_modules.py has `enable_high_performance`, which shards the gate/up split per TP rank (then a TP>1
checkpoint would hold [G_r;U_r]); this fixture is source TP 1. YAML: configs/glm4/finetune_glm4_9b.yaml
(268b63fad89e): ChatGLM2Config with `padded_vocab_size`, `ffn_hidden_size`, `kv_channels`,
`layernorm_epsilon: 1.5625e-07`, `rope_ratio: 1`, `rmsnorm: True`, `add_qkv_bias: True`,
`multi_query_attention: True`, `multi_query_group_num: 2`, `qkv_concat: True`, `mlp_concat: True`.
Stored fp32 (`param_init_type: "float32"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.families import mflayout
from tests.families.case import Case, Tensors
from tests.families.mfio import optimizer_state, run_sections, save_single, write_yaml
from tests.families.truth import Dims, Truth, make_truth

DIMS = Dims(qkv_bias=True)


def tensors(t: Truth) -> Tensors:
    out: Tensors = {"transformer.embedding.embedding_weight": t["embed"]}
    for i in range(t.dims.layers):
        p, x = f"transformer.encoder.layers.{i}.", t.layer
        out[p + "input_layernorm.weight"] = x(i, "input_norm.weight")
        for kind in ("weight", "bias"):
            out[f"{p}self_attention.query_key_value.{kind}"] = mflayout.qkv_contiguous(
                x(i, f"q.{kind}"), x(i, f"k.{kind}"), x(i, f"v.{kind}"))
        out[p + "self_attention.dense.weight"] = x(i, "o.weight")
        out[p + "post_attention_layernorm.weight"] = x(i, "post_norm.weight")
        out[p + "mlp.dense_h_to_4h.weight"] = mflayout.gate_up(x(i, "gate.weight"), x(i, "up.weight"))
        out[p + "mlp.dense_4h_to_h.weight"] = x(i, "down.weight")
    out["transformer.encoder.final_layernorm.weight"] = t["norm.weight"]
    out["transformer.output_layer.weight"] = t["lm_head"]
    return out


def model_config(d: Dims, rope_ratio: int) -> dict[str, Any]:
    return {
        "type": "ChatGLM2Config", "batch_size": 1, "num_layers": d.layers, "padded_vocab_size": d.vocab,
        "hidden_size": d.hidden, "ffn_hidden_size": d.ffn, "kv_channels": d.head_dim,
        "num_attention_heads": d.heads, "seq_length": 8192, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "layernorm_epsilon": 1.5625e-07, "rope_ratio": rope_ratio, "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "add_bias_linear": False,
        "add_qkv_bias": True, "bias_dropout_fusion": True, "multi_query_attention": True,
        "multi_query_group_num": d.groups, "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True, "fp32_residual_connection": False, "compute_dtype": "bfloat16",
        "layernorm_compute_type": "float32", "param_init_type": "float32", "rotary_dtype": "float32",
        "use_past": False, "qkv_concat": True, "mlp_concat": True, "use_flash_attention": True,
        "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "offset": 0,
    }


def build(root: Path, rope_ratio: int = 1, seed: int = 11) -> Case:
    t = make_truth(DIMS, seed)
    weights = tensors(t)
    opt = optimizer_state("adamw-moments", weights)
    name = f"glm4-rope{rope_ratio}"
    save_single(root / name, "glm4_rank_0-1_1.safetensors", {**weights, **opt})
    doc = {**run_sections("glm4_9b", 1),
           "model": {"model_config": model_config(DIMS, rope_ratio),
                     "arch": {"type": "ChatGLM2ForConditionalGeneration"}}}
    config = write_yaml(root / f"{name}.yaml", doc)
    stated = {"rotary_base": 10000 * rope_ratio, "rotary_percent": 0.5, "rotary_interleaved": True,
              "norm_epsilon": 1.5625e-07, "seq_length": 8192, "num_query_groups": 2, "add_qkv_bias": True,
              "add_bias_linear": False}
    return Case(name, root / name, config, t, (), stated, frozenset(opt))
