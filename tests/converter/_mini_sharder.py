"""A tiny test-only Megatron sharder, written straight from target-format.md, to validate the test harness.

It turns the *logical* sample weights into a Megatron-LM legacy `torch` checkpoint (local spec, no
`decoder.final_layernorm._extra_state`): grouped QKV (§7.1), `[gate_r; up_r]` fc1 per rank (§7.2), TP split
rules (§4.3), vocab padding to a multiple of 128·tp replicating the last row (§4.2), PP stages with local
layer numbering, tied → `output_layer.weight` copy of the embedding shard on the last stage when PP > 1
(§4.4), and the `args` Namespace (§10). It exists only so `reference_model` and `megatron_consumer` can be
shown to agree before the real converter is used; the converter does not share any of this code.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import torch

from ms2mg_converter.demo.sample import SampleSpec, fuse_qkv


def _args(spec: SampleSpec, tp: int, pp: int, padded_vocab: int, dtype: torch.dtype) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, group_query_attention=True,
        num_query_groups=spec.num_query_groups, kv_channels=spec.head_dim,
        seq_length=spec.max_position_embeddings,
        max_position_embeddings=spec.max_position_embeddings, padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=128, position_embedding_type=spec.position_embedding_type,
        add_position_embedding=spec.position_embedding_type == "learned_absolute", rotary_base=10000,
        rotary_percent=1.0, rotary_interleaved=False, normalization=spec.normalization, norm_epsilon=1e-5,
        swiglu=spec.swiglu, add_bias_linear=spec.bias == "all", add_qkv_bias=spec.bias != "none",
        qk_layernorm=spec.qk_layernorm, untie_embeddings_and_output_weights=not spec.tied,
        fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=False, apply_query_key_layer_scaling=False, num_experts=None,
        tokenizer_type="NullTokenizer", ckpt_format="torch", iteration=1,
    )


def _pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    if rows <= t.shape[0]:
        return t[:rows]
    return torch.cat((t, t[-1:].expand(rows - t.shape[0], -1)))


def _layer(w: dict[str, torch.Tensor], spec: SampleSpec, i: int, tp: int, r: int,
           qkv_layout: str) -> dict[str, torch.Tensor]:
    src = f"model.layers.{i}."
    out: dict[str, torch.Tensor] = {}

    def col(t: torch.Tensor) -> torch.Tensor:  # contiguous split along dim 0
        return t.chunk(tp, dim=0)[r]

    def row(t: torch.Tensor) -> torch.Tensor:  # contiguous split along dim 1
        return t.chunk(tp, dim=1)[r]

    for kind in ("weight", "bias"):
        if f"{src}input_layernorm.{kind}" in w:
            out[f"input_layernorm.{kind}"] = w[f"{src}input_layernorm.{kind}"]
    for kind in ("weight", "bias"):
        if f"{src}self_attn.q_proj.{kind}" in w:
            q, k, v = (w[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv")
            fused = fuse_qkv(q, k, v, spec.num_query_groups, "contiguous" if qkv_layout == "contiguous"
                             else "grouped")
            out[f"self_attention.linear_qkv.{kind}"] = col(fused)
    out["self_attention.linear_proj.weight"] = row(w[f"{src}self_attn.o_proj.weight"])
    if f"{src}self_attn.o_proj.bias" in w:
        out["self_attention.linear_proj.bias"] = w[f"{src}self_attn.o_proj.bias"]
    for norm in ("q", "k"):
        for kind in ("weight", "bias"):
            if f"{src}self_attn.{norm}_norm.{kind}" in w:
                out[f"self_attention.{norm}_layernorm.{kind}"] = w[f"{src}self_attn.{norm}_norm.{kind}"]
    for kind in ("weight", "bias"):
        if f"{src}post_attention_layernorm.{kind}" in w:
            out[f"pre_mlp_layernorm.{kind}"] = w[f"{src}post_attention_layernorm.{kind}"]
    for kind in ("weight", "bias"):
        if f"{src}mlp.up_proj.{kind}" in w:
            up = col(w[f"{src}mlp.up_proj.{kind}"])
            out[f"mlp.linear_fc1.{kind}"] = torch.cat((col(w[f"{src}mlp.gate_proj.{kind}"]), up)) \
                if spec.swiglu else up
    out["mlp.linear_fc2.weight"] = row(w[f"{src}mlp.down_proj.weight"])
    if f"{src}mlp.down_proj.bias" in w:
        out["mlp.linear_fc2.bias"] = w[f"{src}mlp.down_proj.bias"]
    return out


def shard(weights: dict[str, torch.Tensor], spec: SampleSpec, out_dir: Path, tp: int, pp: int,
          qkv_layout: str = "grouped", dtype: torch.dtype = torch.float32) -> Path:
    """Write the TP×PP Megatron checkpoint of the logical `weights` into `out_dir` and return it.

    `qkv_layout="contiguous"` deliberately writes the wrong (non-Megatron) QKV row order.
    """
    multiple = 128 * tp
    padded = -(-spec.vocab_size // multiple) * multiple
    emb = _pad_vocab(weights["model.embed_tokens.weight"], padded).chunk(tp)
    head = None if spec.tied else _pad_vocab(weights["lm_head.weight"], padded).chunk(tp)
    per_stage = spec.num_layers // pp
    it_dir = out_dir / "iter_0000001"
    for p in range(pp):
        for r in range(tp):
            sd: OrderedDict[str, torch.Tensor | None] = OrderedDict()
            if p == 0:
                sd["embedding.word_embeddings.weight"] = emb[r]
                if "model.embed_positions.weight" in weights:
                    sd["embedding.position_embeddings.weight"] = weights["model.embed_positions.weight"]
            for j in range(per_stage):
                for name, t in _layer(weights, spec, p * per_stage + j, tp, r, qkv_layout).items():
                    sd[f"decoder.layers.{j}.{name}"] = t
            if p == pp - 1:
                sd["decoder.final_layernorm.weight"] = weights["model.norm.weight"]
                if "model.norm.bias" in weights:
                    sd["decoder.final_layernorm.bias"] = weights["model.norm.bias"]
                if head is not None:
                    sd["output_layer.weight"] = head[r]
                elif pp > 1:
                    sd["output_layer.weight"] = emb[r]
                sd["output_layer._extra_state"] = None
            model = OrderedDict((k, v if v is None else v.to(dtype).clone()) for k, v in sd.items())
            name = f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{p:03d}"
            (it_dir / name).mkdir(parents=True, exist_ok=True)
            torch.save({"args": _args(spec, tp, pp, padded, dtype), "checkpoint_version": 3.0, "iteration": 1,
                        "model": model}, it_dir / name / "model_optim_rng.pt")
    (out_dir / "latest_checkpointed_iteration.txt").write_text("1", encoding="utf-8")
    return out_dir
