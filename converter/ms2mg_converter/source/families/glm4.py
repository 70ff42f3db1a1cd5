"""GLM-4 in MindFormers' ChatGLM2 naming (mindformers/models/glm2, configs/glm4).

Names (glm2.py, glm2_transformer.py, glm2_modules.py; read at mindspore-lab/mindformers 07067d3 / 000a5cf):
transformer.embedding.embedding_weight; transformer.encoder.layers.N.{input_layernorm,
self_attention.query_key_value.{weight,bias}, self_attention.dense, post_attention_layernorm,
mlp.dense_h_to_4h, mlp.dense_4h_to_h}; transformer.encoder.final_layernorm; transformer.output_layer.
Layouts the code fixes: query_key_value is split (nh*d, ng*d, ng*d), i.e. [Q;K;V] (per training TP rank
like every contiguous split, so the source TP size is needed); dense_h_to_4h is split in halves with SiLU
on the first: [gate; up]. RoPE (glm2_modules.py apply_rotary_pos_emb / RopeCache): only the first half of
each head's dimensions is rotated, as adjacent pairs, with base 10000 * rope_ratio: Megatron's
rotary_percent 0.5 and rotary_interleaved True; q/k rows need no permutation.
Uncertain: an older convert_weight.py named the table embedding_table; a newer glm2_modules.py mode
(enable_high_performance) may shard the gate/up split per TP rank. Neither is accepted here.
"""

from __future__ import annotations

from ms2mg_converter.layout import Copy, GluFused, QkvFused
from ms2mg_converter.names import EMBED, FC1, FC2, FINAL, INPUT_NORM, MLP_NORM, OUTPUT, PROJ, QKV
from ms2mg_converter.source.families.base import Family, Recipe
from ms2mg_converter.source.families.registry import register

_T = "transformer.encoder.layers.{layer}."

GLM4 = register(Family(
    name="glm4",
    description="MindFormers ChatGLM2/GLM-4 names: transformer.embedding.embedding_weight, "
                "transformer.encoder.layers.N.{self_attention.query_key_value, self_attention.dense, "
                "mlp.dense_h_to_4h, mlp.dense_4h_to_h, input_layernorm, post_attention_layernorm}, "
                "transformer.encoder.final_layernorm, transformer.output_layer",
    recipes=(
        Recipe(EMBED, Copy, ("transformer.embedding.embedding_weight",)),
        Recipe(OUTPUT, Copy, ("transformer.output_layer.weight",)),
        *(Recipe(f"{FINAL}.{p}", Copy, (f"transformer.encoder.final_layernorm.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{INPUT_NORM}.{p}", Copy, (f"{_T}input_layernorm.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{MLP_NORM}.{p}", Copy, (f"{_T}post_attention_layernorm.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{QKV}.{p}", QkvFused, (f"{_T}self_attention.query_key_value.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{PROJ}.{p}", Copy, (f"{_T}self_attention.dense.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{FC1}.{p}", GluFused, (f"{_T}mlp.dense_h_to_4h.{p}",)) for p in ("weight", "bias")),
        *(Recipe(f"{FC2}.{p}", Copy, (f"{_T}mlp.dense_4h_to_h.{p}",)) for p in ("weight", "bias")),
    ),
    fused_qkv_default="contiguous",
    fused_fc1_default="gate-up",
    facts={"rotary_percent": 0.5, "rotary_interleaved": True},
))
