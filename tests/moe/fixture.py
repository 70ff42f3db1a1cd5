"""A small MindFormers mcore MoE checkpoint built from an independent HF-style unfused truth.

The truth has per-expert `gate`/`up`/`down` (torch `(out, in)`), a router `[E, h]`, an expert bias, shared
experts and a first dense layer (DeepSeek/`first_k_dense_replace` style). `write_mindformers` fuses it as
MindFormers writes it (shared/docs/mindformers-moe-mla-distributed.md §1.1-1.2; `ModelMixin.concat_expert_weight`):
`experts.weight1` = stack([G_e; U_e]).permute(0, 2, 1) stored `[E*h, 2F]` (r1.7+) or `[h, E*2F]` (r1.6),
`experts.weight2` = stack(down_e).permute(0, 2, 1) `[E*F, h]`, shared and dense fc1 rows interleaved
(`use_interleaved_weight_layout_mlp: True`). `expected_ranks` builds what Megatron's files must hold from the
truth with its own slicing (no converter code).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MoeDims:
    layers: int = 3
    dense: int = 1
    """First layers with a dense MLP (first_k_dense_replace)."""
    hidden: int = 32
    heads: int = 4
    groups: int = 2
    head_dim: int = 8
    ffn: int = 48
    experts: int = 4
    moe_ffn: int = 16
    shared: int | None = 24
    bias: bool = True
    vocab: int = 256
    topk: int = 2
    version: str = "r1.7"


def make_truth(d: MoeDims, seed: int = 0) -> Tensors:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, norm: bool = False) -> torch.Tensor:
        t = torch.randn(shape, generator=g)
        return 1.0 + 0.1 * t if norm else t * 0.2

    h, q, kv = d.hidden, d.heads * d.head_dim, d.groups * d.head_dim
    t: Tensors = {"embed": rnd(d.vocab, h), "lm_head": rnd(d.vocab, h), "norm": rnd(h, norm=True)}
    for i in range(d.layers):
        t |= {f"{i}.input_norm": rnd(h, norm=True), f"{i}.post_norm": rnd(h, norm=True), f"{i}.q": rnd(q, h),
              f"{i}.k": rnd(kv, h), f"{i}.v": rnd(kv, h), f"{i}.o": rnd(h, q)}
        if i < d.dense:
            t |= {f"{i}.gate": rnd(d.ffn, h), f"{i}.up": rnd(d.ffn, h), f"{i}.down": rnd(h, d.ffn)}
            continue
        t[f"{i}.router"] = rnd(d.experts, h)
        if d.bias:
            t[f"{i}.expert_bias"] = rnd(d.experts)
        for x in range(d.experts):
            t |= {f"{i}.e{x}.gate": rnd(d.moe_ffn, h), f"{i}.e{x}.up": rnd(d.moe_ffn, h),
                  f"{i}.e{x}.down": rnd(h, d.moe_ffn)}
        if d.shared:
            t |= {f"{i}.shared.gate": rnd(d.shared, h), f"{i}.shared.up": rnd(d.shared, h),
                  f"{i}.shared.down": rnd(h, d.shared)}
    return t


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.stack([gate, up], dim=1).reshape(-1, gate.shape[1])


def _qkv_grouped(t: Tensors, i: int, d: MoeDims) -> torch.Tensor:
    parts = [t[f"{i}.{n}"].reshape(d.groups, -1, d.hidden) for n in "qkv"]
    return torch.cat(parts, dim=1).reshape(-1, d.hidden)


def mindformers_tensors(d: MoeDims, t: Tensors) -> Tensors:
    """The truth under MindFormers mcore names and layouts (plus run-time counters it saves)."""
    out: Tensors = {"embedding.word_embeddings.weight": t["embed"], "output_layer.weight": t["lm_head"],
                    "decoder.final_layernorm.weight": t["norm"]}
    h, f = d.hidden, d.moe_ffn
    for i in range(d.layers):
        p = f"decoder.layers.{i}."
        out |= {p + "input_layernorm.weight": t[f"{i}.input_norm"], p + "pre_mlp_layernorm.weight": t[f"{i}.post_norm"],
                p + "self_attention.linear_qkv.weight": _qkv_grouped(t, i, d),
                p + "self_attention.linear_proj.weight": t[f"{i}.o"]}
        if i < d.dense:
            out |= {p + "mlp.linear_fc1.weight": _interleave(t[f"{i}.gate"], t[f"{i}.up"]),
                    p + "mlp.linear_fc2.weight": t[f"{i}.down"]}
            continue
        out[p + "mlp.router.weight"] = t[f"{i}.router"]
        out[p + "mlp.router.expert_load"] = torch.zeros(d.experts)
        out[p + "mlp.router.fi_accu"] = torch.zeros(d.experts)
        if d.bias:
            out[p + "mlp.router.expert_bias"] = t[f"{i}.expert_bias"]
        fc1 = [torch.cat([t[f"{i}.e{x}.gate"], t[f"{i}.e{x}.up"]]) for x in range(d.experts)]
        w1 = torch.stack(fc1).permute(0, 2, 1)  # [E, h, 2F]
        w1 = w1.reshape(d.experts * h, 2 * f) if d.version == "r1.7" else w1.reshape(h, d.experts * 2 * f)
        w2 = torch.stack([t[f"{i}.e{x}.down"] for x in range(d.experts)]).permute(0, 2, 1).reshape(-1, h)
        out |= {p + "mlp.experts.weight1": w1.contiguous(), p + "mlp.experts.weight2": w2.contiguous()}
        if d.shared:
            out |= {p + "mlp.shared_experts.linear_fc1.weight": _interleave(t[f"{i}.shared.gate"], t[f"{i}.shared.up"]),
                    p + "mlp.shared_experts.linear_fc2.weight": t[f"{i}.shared.down"]}
    return out


def yaml_doc(d: MoeDims, topk: bool = True) -> dict[str, Any]:
    section: dict[str, Any] = {
        "num_layers": d.layers, "hidden_size": d.hidden, "num_attention_heads": d.heads,
        "num_query_groups": d.groups, "kv_channels": d.head_dim, "ffn_hidden_size": d.ffn,
        "num_moe_experts": d.experts, "moe_ffn_hidden_size": d.moe_ffn, "first_k_dense_replace": d.dense,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": d.bias,
        "routed_scaling_factor": 2.5, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "use_contiguous_weight_layout_attention": False, "use_interleaved_weight_layout_mlp": True,
        "tie_word_embeddings": False,
    }
    if d.shared:
        section["moe_shared_expert_intermediate_size"] = d.shared
    if topk:
        section["num_experts_per_tok"] = d.topk
    return {"model": {"model_config": section}, "parallel_config": {"model_parallel": 1}}


def per_expert(d: MoeDims, t: Tensors, tensors: Tensors, infix: str) -> Tensors:
    """The grouped weight1/weight2 replaced by per-expert `mlp.experts.{infix}{x}.linear_fc1/fc2.weight`
    (`(out, in)`, fc1 `[G; U]`)."""
    out = {k: v for k, v in tensors.items() if not k.endswith(("experts.weight1", "experts.weight2"))}
    for i in range(d.dense, d.layers):
        for x in range(d.experts):
            p = f"decoder.layers.{i}.mlp.experts.{infix}{x}."
            out[p + "linear_fc1.weight"] = torch.cat([t[f"{i}.e{x}.gate"], t[f"{i}.e{x}.up"]])
            out[p + "linear_fc2.weight"] = t[f"{i}.e{x}.down"]
    return out


def write_mindformers(root: Path, d: MoeDims, t: Tensors, topk_in_yaml: bool = True,
                      drop: tuple[str, ...] = (), experts_infix: str | None = None) -> tuple[Path, Path]:
    """(load dir, yaml) of the MindFormers checkpoint of `t` (`experts_infix`: per-expert names instead)."""
    src = root / "mf"
    src.mkdir(parents=True, exist_ok=True)
    tensors = mindformers_tensors(d, t)
    if experts_infix is not None:
        tensors = per_expert(d, t, tensors, experts_infix)
    tensors = {k: v.contiguous() for k, v in tensors.items() if k not in drop}
    save_file(tensors, str(src / "model.safetensors"))
    cfg = root / "model.yaml"
    cfg.write_text(yaml.safe_dump(yaml_doc(d, topk_in_yaml)), encoding="utf-8")
    return src, cfg


# -------------------------------------------------------------------------------- expected Megatron files

def _glu_shard(gate: torch.Tensor, up: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])


def _layer(d: MoeDims, t: Tensors, i: int, j: int, tp: int, r: int, ep: int, e: int, grouped: bool) -> Tensors:
    p, out = f"decoder.layers.{j}.", {}
    qkv = _qkv_grouped(t, i, d).reshape(d.groups, -1, d.hidden).chunk(tp)[r].reshape(-1, d.hidden)
    out |= {p + "input_layernorm.weight": t[f"{i}.input_norm"],
            p + "self_attention.linear_proj.weight": t[f"{i}.o"].chunk(tp, dim=1)[r],
            p + "self_attention.linear_qkv.weight": qkv, p + "pre_mlp_layernorm.weight": t[f"{i}.post_norm"]}
    if i < d.dense:
        out[p + "mlp.linear_fc1.weight"] = _glu_shard(t[f"{i}.gate"], t[f"{i}.up"], tp, r)
        out[p + "mlp.linear_fc2.weight"] = t[f"{i}.down"].chunk(tp, dim=1)[r]
        return out
    out[p + "mlp.router.weight"] = t[f"{i}.router"]
    if d.bias:
        out[p + "mlp.router.expert_bias"] = t[f"{i}.expert_bias"]
    per = d.experts // ep
    for k in range(per):
        x = e * per + k
        fc1 = _glu_shard(t[f"{i}.e{x}.gate"], t[f"{i}.e{x}.up"], tp, r)
        fc2 = t[f"{i}.e{x}.down"].chunk(tp, dim=1)[r]
        if grouped:
            out[f"{p}mlp.experts.linear_fc1.weight{k}"] = fc1
            out[f"{p}mlp.experts.linear_fc2.weight{k}"] = fc2
        else:
            out[f"{p}mlp.experts.local_experts.{k}.linear_fc1.weight"] = fc1
            out[f"{p}mlp.experts.local_experts.{k}.linear_fc2.weight"] = fc2
    if d.shared:
        out[p + "mlp.shared_experts.linear_fc1.weight"] = _glu_shard(t[f"{i}.shared.gate"], t[f"{i}.shared.up"], tp, r)
        out[p + "mlp.shared_experts.linear_fc2.weight"] = t[f"{i}.shared.down"].chunk(tp, dim=1)[r]
    return out


def expected_ranks(d: MoeDims, t: Tensors, tp: int, ep: int, grouped: bool = False) -> dict[str, Tensors]:
    """Rank directory -> every tensor (no `_extra_state`) Megatron's file must hold (PP 1)."""
    out = {}
    for e in range(ep):
        for r in range(tp):
            name = f"mp_rank_{r:02d}" + (f"_{e:03d}" if ep > 1 else "")
            rank = {"embedding.word_embeddings.weight": t["embed"].chunk(tp)[r],
                    "decoder.final_layernorm.weight": t["norm"], "output_layer.weight": t["lm_head"].chunk(tp)[r]}
            for i in range(d.layers):
                rank |= _layer(d, t, i, i, tp, r, ep, e, grouped)
            out[name] = rank
    return out
