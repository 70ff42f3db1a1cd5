"""What a correct conversion writes: the truth re-fused in Megatron's layout, split per TP rank and PP stage.

Written from shared/docs/target-format.md only (it imports nothing from `ms2mg_converter`):
- §7.1 `linear_qkv` rows per query group g: the group's Q heads, then K head g, then V head g.
- §7.2 SwiGLU `linear_fc1` = [gate; up]; TP rank r holds [gate_r; up_r] (not a contiguous slice).
- §4.2 vocabulary: padded to a multiple of 128·TP, new rows repeat the last row.
- §4.3 split rules: embedding/output and qkv/fc1 rows, proj/fc2 columns, norms and row-parallel biases
  replicated. §4.4: local layer numbers per stage; tied embeddings put a copy of the embedding shard in
  `output_layer.weight` on the last stage when PP > 1. §5.3: the local spec's `_extra_state` keys.
A Megatron model has a bias on all linears or none (`add_bias_linear`) plus the qkv-only `add_qkv_bias`;
a source with biases on o/down only (TeleChat2) is therefore expected with zero q/k/v and fc1 biases,
which computes the same thing.
"""

from __future__ import annotations

import torch

from tests.families.truth import Dims, Truth

OUT_DTYPE = torch.bfloat16
Rank = dict[str, torch.Tensor | None]


def padded_vocab(true_vocab: int, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return -(-true_vocab // multiple) * multiple


def all_bias(d: Dims) -> bool:
    """Megatron's add_bias_linear for this model."""
    return d.linear_bias or d.out_bias


def qkv_bias(d: Dims) -> bool:
    return d.qkv_bias or all_bias(d)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if rows <= t.shape[0]:
        return t[:rows]
    return torch.cat([t, t[-1:].repeat(rows - t.shape[0], 1)])


def _grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Dims) -> torch.Tensor:
    per_group = d.heads // d.groups * d.head_dim
    parts = []
    for g in range(d.groups):
        parts += [q[g * per_group:(g + 1) * per_group], k[g * d.head_dim:(g + 1) * d.head_dim],
                  v[g * d.head_dim:(g + 1) * d.head_dim]]
    return torch.cat(parts)


def _bias(t: Truth, i: int, name: str, rows: int) -> torch.Tensor:
    """The truth's bias, or zeros where Megatron needs a bias the source does not have."""
    b = t.layer_opt(i, f"{name}.bias")
    return torch.zeros(rows, dtype=t.dims.dtype) if b is None else b


def _norm(t: Truth, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{dst}.weight"] = t[f"{src}.weight"]
    if t.dims.layernorm:
        out[f"{dst}.bias"] = t[f"{src}.bias"]


def _attention(t: Truth, i: int, out: dict[str, torch.Tensor]) -> None:
    d, a = t.dims, "self_attention."
    out[a + "linear_qkv.weight"] = _grouped_qkv(t.layer(i, "q.weight"), t.layer(i, "k.weight"),
                                                t.layer(i, "v.weight"), d)
    if qkv_bias(d):
        q_rows, kv_rows = d.heads * d.head_dim, d.groups * d.head_dim
        out[a + "linear_qkv.bias"] = _grouped_qkv(_bias(t, i, "q", q_rows), _bias(t, i, "k", kv_rows),
                                                  _bias(t, i, "v", kv_rows), d)
    out[a + "linear_proj.weight"] = t.layer(i, "o.weight")
    if all_bias(d):
        out[a + "linear_proj.bias"] = t.layer(i, "o.bias")
    if d.qk_norm:
        out[a + "q_layernorm.weight"] = t.layer(i, "q_norm.weight")
        out[a + "k_layernorm.weight"] = t.layer(i, "k_norm.weight")


def _mlp(t: Truth, i: int, out: dict[str, torch.Tensor]) -> None:
    d = t.dims
    fc1 = ("gate", "up") if d.swiglu else ("up",)
    out["mlp.linear_fc1.weight"] = torch.cat([t.layer(i, f"{n}.weight") for n in fc1])
    if all_bias(d):
        out["mlp.linear_fc1.bias"] = torch.cat([_bias(t, i, n, d.ffn) for n in fc1])
    out["mlp.linear_fc2.weight"] = t.layer(i, "down.weight")
    if all_bias(d):
        out["mlp.linear_fc2.bias"] = t.layer(i, "down.bias")


def megatron_layer(t: Truth, i: int) -> dict[str, torch.Tensor]:
    """Layer i in Megatron's TP1 layout, keys relative to `decoder.layers.N.`."""
    out: dict[str, torch.Tensor] = {}
    _norm(t, f"{i}.input_norm", "input_layernorm", out)
    _attention(t, i, out)
    _norm(t, f"{i}.post_norm", "pre_mlp_layernorm", out)
    _mlp(t, i, out)
    return out


def _split(name: str, x: torch.Tensor, d: Dims, tp: int, r: int) -> torch.Tensor:
    if name.startswith("mlp.linear_fc1.") and d.swiglu:
        gate, up = x.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[r], up.chunk(tp, dim=0)[r]])
    if name.startswith(("self_attention.linear_qkv.", "mlp.linear_fc1.")):
        return x.chunk(tp, dim=0)[r]
    if name in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return x.chunk(tp, dim=1)[r]
    return x


def _layer_keys(t: Truth, tp: int, r: int, layer: int, local: int) -> Rank:
    out: Rank = {}
    for name, x in megatron_layer(t, layer).items():
        out[f"decoder.layers.{local}.{name}"] = _split(name, x, t.dims, tp, r)
    for linear in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                   "mlp.linear_fc2"):
        out[f"decoder.layers.{local}.{linear}._extra_state"] = None
    return out


def _last_stage(t: Truth, tp: int, pp: int, r: int, vp: int, final_extra: bool) -> Rank:
    out: Rank = {}
    final: dict[str, torch.Tensor] = {}
    _norm(t, "norm", "decoder.final_layernorm", final)
    out.update(final)
    if final_extra:
        out["decoder.final_layernorm._extra_state"] = None
    if not t.dims.tied:
        out["output_layer.weight"] = _pad_rows(t["lm_head"], vp).chunk(tp)[r]
    elif pp > 1:
        out["output_layer.weight"] = _pad_rows(t["embed"], vp).chunk(tp)[r]
    out["output_layer._extra_state"] = None
    return out


def expected_ranks(t: Truth, tp: int, pp: int, final_extra: bool = True) -> dict[str, Rank]:
    """Rank directory name (`mp_rank_TT[_PPP]`) -> the `model` dict Megatron's saver writes, in bf16."""
    d, vp = t.dims, padded_vocab(t.dims.vocab, tp)
    per = d.layers // pp
    ranks: dict[str, Rank] = {}
    for p in range(pp):
        for r in range(tp):
            sd: Rank = {}
            if p == 0:
                sd["embedding.word_embeddings.weight"] = _pad_rows(t["embed"], vp).chunk(tp)[r]
            for j in range(per):
                sd.update(_layer_keys(t, tp, r, p * per + j, j))
            if p == pp - 1:
                sd.update(_last_stage(t, tp, pp, r, vp, final_extra))
            name = f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{p:03d}"
            ranks[name] = {k: None if v is None else v.to(OUT_DTYPE) for k, v in sd.items()}
    return ranks


def expected_args(d: Dims, tp: int, pp: int) -> dict[str, object]:
    """The architecture `args` every rank file must carry (target-format.md §5.2, §10)."""
    return {
        "num_layers": d.layers, "hidden_size": d.hidden, "ffn_hidden_size": d.ffn,
        "num_attention_heads": d.heads, "num_query_groups": d.groups,
        "group_query_attention": d.groups != d.heads, "kv_channels": d.head_dim,
        "swiglu": d.swiglu, "add_bias_linear": all_bias(d), "add_qkv_bias": qkv_bias(d),
        "qk_layernorm": d.qk_norm, "normalization": "LayerNorm" if d.layernorm else "RMSNorm",
        "untie_embeddings_and_output_weights": not d.tied, "padded_vocab_size": padded_vocab(d.vocab, tp),
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
    }
