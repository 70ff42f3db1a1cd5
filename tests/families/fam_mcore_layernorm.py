"""An mcore (`mindformers.parallel_core`) model with `normalization: "LayerNorm"`: norms named gamma/beta.

mindformers/parallel_core/training_graph/transformer/norm.py (read at 13516477efd8): `LayerNorm` and
`FusedLayerNorm` create `Parameter(..., name="gamma")` and `Parameter(..., name="beta")` (the `Norm` /
`FusedNorm` factories pick them when `config.normalization == "LayerNorm"`), while `RMSNorm` /
`FusedRMSNorm` use `weight`. So every norm of such a model is `<path>.gamma` / `<path>.beta`:
`decoder.layers.N.input_layernorm.{gamma,beta}`, `decoder.layers.N.pre_mlp_layernorm.{gamma,beta}`,
`decoder.final_layernorm.{gamma,beta}`; linears keep Megatron names. Uncertain: which shipped MindFormers
config uses LayerNorm in mcore naming (none found); the model here is GPT-style: MHA, biases on all linears
(`add_bias_linear: True`), a plain GELU MLP (`gated_linear_unit: False`, fc1 is not fused), tied
embeddings, grouped `linear_qkv` (r1.7+ `use_contiguous_weight_layout_attention: False`; with MHA every
group is one head, so grouped and contiguous differ). Stored fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.families import mflayout
from tests.families.case import Case
from tests.families.fam_qwen3 import mcore_tensors
from tests.families.mfio import optimizer_state, run_sections, save_single, write_yaml
from tests.families.truth import Dims, make_truth

DIMS = Dims(heads=4, groups=4, head_dim=16, ffn=128, swiglu=False, linear_bias=True, layernorm=True, tied=True)


def model_config(d: Dims) -> dict[str, Any]:
    return {
        "vocab_size": d.vocab, "hidden_size": d.hidden, "intermediate_size": d.ffn,
        "num_hidden_layers": d.layers, "num_attention_heads": d.heads, "num_key_value_heads": d.groups,
        "hidden_act": "gelu", "gated_linear_unit": False, "normalization": "LayerNorm",
        "layernorm_epsilon": 1.0e-6, "max_position_embeddings": 2048, "seq_length": 2048,
        "rope_theta": 50000.0, "tie_word_embeddings": True, "add_bias_linear": True,
        "position_embedding_type": "rope", "use_contiguous_weight_layout_attention": False, "qkv_concat": True,
        "params_dtype": "float32", "compute_dtype": "bfloat16",
    }


def build(root: Path, seed: int = 17) -> Case:
    t = make_truth(DIMS, seed)
    weights = mcore_tensors(t, lambda q, k, v: mflayout.qkv_grouped(q, k, v, DIMS.groups),
                            mflayout.gate_up, norm=("gamma", "beta"))
    opt = optimizer_state("adamw-moments", weights)
    save_single(root / "mcore-layernorm", "gpt_rank_0-1_1.safetensors", {**weights, **opt})
    doc = {**run_sections("gpt", 1), "use_legacy": False, "model": {"model_config": model_config(DIMS)}}
    config = write_yaml(root / "mcore-layernorm.yaml", doc)
    stated = {"normalization": "LayerNorm", "norm_epsilon": 1.0e-6, "rotary_base": 50000,
              "max_position_embeddings": 2048, "num_query_groups": 4, "add_bias_linear": True}
    return Case("mcore-layernorm", root / "mcore-layernorm", config, t, (), stated, frozenset(opt))
