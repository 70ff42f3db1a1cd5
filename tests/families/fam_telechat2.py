"""TeleChat2 in MindFormers' research/telechat2 naming.

Names (research/telechat2/convert_weight.py `name_replace` at 00d81d727e5e, HF -> MindFormers):
`model.tok_embeddings.embedding_weight` (telechat_layer.py `TelechatEmbedding.embedding_weight`),
`model.layers.N.attention_norm.weight`, `model.layers.N.attention.wq.weight`,
`model.layers.N.attention.wk_v.weight` (HF `self_attention.key_value`), `model.layers.N.attention.wo.{weight,
bias}`, `model.layers.N.ffn_norm.weight`, `model.layers.N.feed_forward.{w1,w3}.weight`,
`model.layers.N.feed_forward.w2.{weight,bias}`, `model.norm_out.weight` (HF `transformer.ln_f`),
`lm_head.weight`. Biases: `wo` (attention `wo_has_bias=True`) and `w2` (telechat_layer.py
`TelechatFeedForward.w2` `has_bias=True`) only; q/k/v and w1/w3 have none.
`wk_v` rows: per KV head [k_h; v_h] (attention: reshape (-1, n_kv_head, head_dim * 2), split (head_dim,
head_dim); convert_weight.py `transformer_new_kv_param` takes even head_dim blocks as K, odd as V), which is
TP-invariant. Stored fp32 (convert_weight.py `--dtype` default float32). YAML: research/telechat2/
telechat2-115b/finetune_telechat_115b.yaml (268b63fad89e): TelechatConfig with `num_heads`, `n_kv_heads: 8`,
`rms_norm_eps: 1.0e-5`, `intermediate_size`, `vocab_size`, no rope base key (telechat_config.py at
0afe877c6eb2: `theta: float = 10000.0`, `max_position_embedding` defaults to `seq_length`, `wo_has_bias`
True). The 7B YAML is MHA (`num_heads: 32`, no `n_kv_heads`); the 115B one has GQA, used here.
Megatron has no "bias on proj and fc2 only": the expected output (expected.py) is add_bias_linear with zero
q/k/v and fc1 biases, which computes the same. The issue does not say this; it is what a user would expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.families import mflayout
from tests.families.case import Case, Tensors
from tests.families.fam_llama3 import legacy_common
from tests.families.mfio import optimizer_state, run_sections, save_single, write_yaml
from tests.families.truth import Dims, Truth, make_truth

DIMS = Dims(out_bias=True)


def attention_mlp(t: Truth) -> Tensors:
    out: Tensors = {}
    for i in range(t.dims.layers):
        p, x = f"model.layers.{i}.", t.layer
        out[p + "attention.wq.weight"] = x(i, "q.weight")
        out[p + "attention.wk_v.weight"] = mflayout.kv_per_head(x(i, "k.weight"), x(i, "v.weight"), t.dims.groups)
        out[p + "feed_forward.w1.weight"] = x(i, "gate.weight")
        out[p + "feed_forward.w3.weight"] = x(i, "up.weight")
    return out


def model_config(d: Dims) -> dict[str, Any]:
    return {
        "type": "TelechatConfig", "auto_register": "telechat_config.TelechatConfig", "batch_size": 1,
        "seq_length": 8192, "hidden_size": d.hidden, "num_layers": d.layers, "num_heads": d.heads,
        "n_kv_heads": d.groups, "vocab_size": d.vocab, "rms_norm_eps": 1.0e-5, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 3, "embed_dropout_prob": 0.0, "hidden_dropout_prob": 0.0,
        "attention_dropout_prob": 0.0, "intermediate_size": d.ffn, "res_dtype": "float32",
        "compute_dtype": "bfloat16", "layernorm_compute_type": "float32", "softmax_compute_type": "float32",
        "rotary_dtype": "float32", "param_init_type": "float32", "use_past": False, "use_flash_attention": True,
        "offset": 0,
    }


def build(root: Path, seed: int = 13) -> Case:
    t = make_truth(DIMS, seed)
    weights = {**legacy_common(t), **attention_mlp(t)}
    opt = optimizer_state("adamw-moments", weights)
    save_single(root / "telechat2", "telechat_115b_rank_0-1_1.safetensors", {**weights, **opt})
    doc = {**run_sections("telechat_115b", 1),
           "model": {"model_config": model_config(DIMS),
                     "arch": {"type": "TelechatForCausalLM", "auto_register": "telechat.TelechatForCausalLM"}}}
    config = write_yaml(root / "telechat2.yaml", doc)
    stated = {"norm_epsilon": 1.0e-5, "seq_length": 8192, "num_query_groups": 2}
    return Case("telechat2", root / "telechat2", config, t, (), stated, frozenset(opt))
