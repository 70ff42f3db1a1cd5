"""Deterministic sample MindFormers checkpoints, for `ms2mg demo`, the tests and the benchmarks.

A sample is made in two steps. `logical_weights(spec)` draws fp32 weights under *logical* names, one tensor
per projection (separate q/k/v and gate/up), in the HF Llama/Qwen naming. That is what an independent
forward pass consumes. `write_checkpoint(spec, weights, out_dir)` then writes them the way a MindFormers
checkpoint stores them, with the naming family, fused layouts, dtype and file split the spec asks for.

Logical names (`i` = layer, `d` = head dim, `nh`/`ng` = heads/query groups, `f` = ffn hidden size):

| logical name | shape | present when |
|---|---|---|
| `model.embed_tokens.weight` | `[vocab, h]` | always |
| `model.embed_positions.weight` | `[max_pos, h]` | `learned_absolute` |
| `model.layers.{i}.input_layernorm.weight` / `.bias` | `[h]` | always / LayerNorm |
| `model.layers.{i}.self_attn.q_proj.weight` / `.bias` | `[nh*d, h]` / `[nh*d]` | always / bias != none |
| `model.layers.{i}.self_attn.k_proj.*`, `v_proj.*` | `[ng*d, h]` / `[ng*d]` | always / bias != none |
| `model.layers.{i}.self_attn.o_proj.weight` / `.bias` | `[h, nh*d]` / `[h]` | always / bias == all |
| `model.layers.{i}.self_attn.q_norm.*`, `k_norm.*` | `[d]` | qk_layernorm (bias: LayerNorm) |
| `model.layers.{i}.post_attention_layernorm.weight` / `.bias` | `[h]` | always / LayerNorm |
| `model.layers.{i}.mlp.gate_proj.weight` / `.bias` | `[f, h]` / `[f]` | swiglu / swiglu and bias == all |
| `model.layers.{i}.mlp.up_proj.weight` / `.bias` | `[f, h]` / `[f]` | always (the only fc1 without swiglu) |
| `model.layers.{i}.mlp.down_proj.weight` / `.bias` | `[h, f]` / `[h]` | always / bias == all |
| `model.norm.weight` / `.bias` | `[h]` | always / LayerNorm |
| `lm_head.weight` | `[vocab, h]` | untied |

Query head `j` belongs to query group `j // (nh/ng)`. Values: linear weights are normal with std
1/sqrt(fan_in), embeddings normal with std 1/sqrt(hidden), norm weights 1 + 0.1·normal, biases 0.1·normal, so
activations stay near unit scale through the layers and a forward pass is well conditioned.

The MindFormers side: "mcore" names are Megatron-core names without a `model.` prefix
(`decoder.layers.{i}.self_attention.linear_qkv.weight`, ...); "legacy" names are the llama-style
`model.layers.{i}.attention.wq.weight`, ... (see target-format.md §3.3). The legacy family has no names for
learned position embeddings or q/k norms; asking for them is a `ValueError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BOOKKEEPING: tuple[str, ...] = ("global_step", "epoch_num", "step_num", "loss_scale", "scale_sense")


@dataclass(frozen=True)
class SampleSpec:
    """What sample checkpoint to make: the architecture, then how MindFormers stores it."""

    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 8
    num_query_groups: int = 4
    kv_channels: int | None = None
    """Head dim; None means hidden_size / num_attention_heads."""
    vocab_size: int = 1000
    """Rows of the MindFormers embedding table as written."""
    swiglu: bool = True
    bias: Literal["none", "all", "qkv"] = "none"
    """Biases on all linears (`add_bias_linear`) or on the qkv projection only (Qwen2)."""
    qk_layernorm: bool = False
    tied: bool = False
    """Tied embeddings: no output layer in the file."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    max_position_embeddings: int = 128
    names: Literal["mcore", "legacy"] = "mcore"
    qkv_layout: Literal["grouped", "contiguous"] = "grouped"
    """Row order of the mcore fused `linear_qkv` (target-format.md §7.1, §7.3)."""
    fc1_layout: Literal["gate-up", "interleaved"] = "gate-up"
    """Row order of the mcore fused SwiGLU `linear_fc1` (target-format.md §7.2, §7.3)."""
    legacy_fused: bool = False
    """Legacy names: `attention.w_qkv` ([Q;K;V]) and `feed_forward.w_gate_hidden` ([gate; up])."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    extra_keys: bool = False
    """Add optimizer and bookkeeping keys (adam_m.*, adam_v.*, global_step, ..., a dropout key)."""
    files: int = 1
    index_json: bool = False
    """Also write `model.safetensors.index.json` (HF-style weight_map)."""
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.num_attention_heads % self.num_query_groups:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                            f"num_query_groups ({self.num_query_groups})")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                            f"({self.num_attention_heads}); give kv_channels")
        if self.legacy_fused and self.names != "legacy":
            problems.append("legacy_fused needs names='legacy'")
        if self.names == "legacy" and (self.qk_layernorm or self.position_embedding_type != "rope"):
            problems.append("legacy names have no q/k norms and no learned position embeddings")
        if self.files < 1:
            problems.append(f"files must be at least 1, not {self.files}")
        if problems:
            raise ValueError("invalid SampleSpec: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        if self.kv_channels is not None:
            return self.kv_channels
        return self.hidden_size // self.num_attention_heads


def logical_weights(spec: SampleSpec) -> dict[str, torch.Tensor]:
    """The sample's fp32 weights under the logical names of the module docstring, drawn from `spec.seed`."""
    gen = torch.Generator().manual_seed(spec.seed)
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    nh, ng = spec.num_attention_heads, spec.num_query_groups
    layer_norm = spec.normalization == "LayerNorm"
    out: dict[str, torch.Tensor] = {}

    def normal(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
        out[name] = torch.randn(shape, generator=gen) * std + mean

    def linear(name: str, rows: int, cols: int, bias: bool) -> None:
        normal(f"{name}.weight", (rows, cols), 1.0 / math.sqrt(cols))
        if bias:
            normal(f"{name}.bias", (rows,), 0.1)

    def norm(name: str, size: int) -> None:
        normal(f"{name}.weight", (size,), 0.1, mean=1.0)
        if layer_norm:
            normal(f"{name}.bias", (size,), 0.1)

    normal("model.embed_tokens.weight", (spec.vocab_size, h), 1.0 / math.sqrt(h))
    if spec.position_embedding_type == "learned_absolute":
        normal("model.embed_positions.weight", (spec.max_position_embeddings, h), 1.0 / math.sqrt(h))
    qkv_bias, all_bias = spec.bias != "none", spec.bias == "all"
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm", h)
        linear(p + "self_attn.q_proj", nh * d, h, qkv_bias)
        linear(p + "self_attn.k_proj", ng * d, h, qkv_bias)
        linear(p + "self_attn.v_proj", ng * d, h, qkv_bias)
        linear(p + "self_attn.o_proj", h, nh * d, all_bias)
        if spec.qk_layernorm:
            norm(p + "self_attn.q_norm", d)
            norm(p + "self_attn.k_norm", d)
        norm(p + "post_attention_layernorm", h)
        if spec.swiglu:
            linear(p + "mlp.gate_proj", f, h, all_bias)
        linear(p + "mlp.up_proj", f, h, all_bias)
        linear(p + "mlp.down_proj", h, f, all_bias)
    norm("model.norm", h)
    if not spec.tied:
        normal("lm_head.weight", (spec.vocab_size, h), 1.0 / math.sqrt(h))
    return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int,
             layout: Literal["grouped", "contiguous"]) -> torch.Tensor:
    """One fused qkv weight `[rows, h]` or bias `[rows]` from the separate projections.

    grouped: per query group g, its Q heads, then K head g, then V head g (Megatron, target-format.md §7.1).
    contiguous: `[Q_all; K_all; V_all]`.
    """
    if layout == "contiguous":
        return torch.cat((q, k, v))
    rest = q.shape[1:]
    ng = num_query_groups
    return torch.cat((q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest)),
                     dim=1).reshape(-1, *rest)


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor, layout: Literal["gate-up", "interleaved"]) -> torch.Tensor:
    """One fused SwiGLU fc1 weight or bias: `[gate; up]`, or rows interleaved g0, u0, g1, u1, ..."""
    if layout == "gate-up":
        return torch.cat((gate, up))
    return torch.stack((gate, up), dim=1).reshape(-1, *gate.shape[1:])


def _mcore_tensors(spec: SampleSpec, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": w["model.embed_tokens.weight"]}
    if "model.embed_positions.weight" in w:
        out["embedding.position_embeddings.weight"] = w["model.embed_positions.weight"]
    for i in range(spec.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        renames = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "pre_mlp_layernorm",
                   "self_attn.o_proj": "self_attention.linear_proj", "self_attn.q_norm":
                   "self_attention.q_layernorm", "self_attn.k_norm": "self_attention.k_layernorm",
                   "mlp.down_proj": "mlp.linear_fc2"}
        for kind in ("weight", "bias"):
            for a, b in renames.items():
                if f"{src}{a}.{kind}" in w:
                    out[f"{dst}{b}.{kind}"] = w[f"{src}{a}.{kind}"]
            if f"{src}self_attn.q_proj.{kind}" in w:
                q, k, v = (w[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv")
                out[f"{dst}self_attention.linear_qkv.{kind}"] = fuse_qkv(q, k, v, spec.num_query_groups,
                                                                          spec.qkv_layout)
            if f"{src}mlp.up_proj.{kind}" in w:
                up = w[f"{src}mlp.up_proj.{kind}"]
                fc1 = fuse_fc1(w[f"{src}mlp.gate_proj.{kind}"], up, spec.fc1_layout) if spec.swiglu else up
                out[f"{dst}mlp.linear_fc1.{kind}"] = fc1
    out["decoder.final_layernorm.weight"] = w["model.norm.weight"]
    if "model.norm.bias" in w:
        out["decoder.final_layernorm.bias"] = w["model.norm.bias"]
    if "lm_head.weight" in w:
        out["output_layer.weight"] = w["lm_head.weight"]
    return out


def _legacy_tensors(spec: SampleSpec, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"model.tok_embeddings.embedding_weight": w["model.embed_tokens.weight"]}
    for i in range(spec.num_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        renames = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.o_proj": "attention.wo", "mlp.down_proj": "feed_forward.w2"}
        if not spec.legacy_fused:
            renames |= {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                        "self_attn.v_proj": "attention.wv", "mlp.gate_proj": "feed_forward.w1",
                        "mlp.up_proj": "feed_forward.w3" if spec.swiglu else "feed_forward.w1"}
        for kind in ("weight", "bias"):
            for a, b in renames.items():
                if f"{src}{a}.{kind}" in w:
                    out[f"{dst}{b}.{kind}"] = w[f"{src}{a}.{kind}"]
            if spec.legacy_fused and f"{src}self_attn.q_proj.{kind}" in w:
                q, k, v = (w[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv")
                out[f"{dst}attention.w_qkv.{kind}"] = fuse_qkv(q, k, v, spec.num_query_groups, spec.qkv_layout)
            if spec.legacy_fused and f"{src}mlp.up_proj.{kind}" in w:
                up = w[f"{src}mlp.up_proj.{kind}"]
                gate_up = fuse_fc1(w[f"{src}mlp.gate_proj.{kind}"], up, spec.fc1_layout) if spec.swiglu else up
                out[f"{dst}feed_forward.w_gate_hidden.{kind}"] = gate_up
    out["model.norm_out.weight"] = w["model.norm.weight"]
    if "model.norm.bias" in w:
        out["model.norm_out.bias"] = w["model.norm.bias"]
    if "lm_head.weight" in w:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def mindformers_tensors(spec: SampleSpec, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MindFormers file contents in file order: named, fused and cast as `spec` asks."""
    named = _mcore_tensors(spec, weights) if spec.names == "mcore" else _legacy_tensors(spec, weights)
    dtype = _DTYPES[spec.dtype]
    out = {k: v.to(dtype).contiguous() for k, v in named.items()}
    if spec.extra_keys:
        for k in list(out):
            out[f"adam_m.{k}"] = torch.zeros(out[k].shape, dtype=torch.float32)
            out[f"adam_v.{k}"] = torch.full(out[k].shape, 1e-8, dtype=torch.float32)
        for k in _BOOKKEEPING:
            out[k] = torch.tensor([1000], dtype=torch.int32) if k.endswith(("step", "num")) \
                else torch.tensor(1024.0)
        layer0 = "decoder.layers.0." if spec.names == "mcore" else "model.layers.0."
        out[f"{layer0}self_attention.core_attention.attention_dropout.seed"] = torch.tensor([0, 0],
                                                                                            dtype=torch.int64)
    return out


def write_checkpoint(spec: SampleSpec, weights: dict[str, torch.Tensor], out_dir: Path) -> list[Path]:
    """Write `weights` (from `logical_weights`) as a MindFormers safetensors checkpoint into `out_dir`.

    One file is `model.safetensors`; N files are `model-0000k-of-0000N.safetensors`, each a contiguous run of
    keys in file order. Returns the paths written: the safetensors files, then the index JSON if asked for.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = mindformers_tensors(spec, weights)
    keys = list(tensors)
    n = min(spec.files, len(keys))
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for j in range(n):
        name = "model.safetensors" if n == 1 else f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        chunk = {k: tensors[k] for k in keys[j * len(keys) // n:(j + 1) * len(keys) // n]}
        save_file(chunk, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
        paths.append(out_dir / name)
    if spec.index_json:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = out_dir / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2),
                         encoding="utf-8")
        paths.append(index)
    return paths


def build_sample(spec: SampleSpec, out_dir: Path) -> dict[str, torch.Tensor]:
    """Draw the logical weights of `spec`, write them as a MindFormers checkpoint, return the weights."""
    weights = logical_weights(spec)
    write_checkpoint(spec, weights, out_dir)
    return weights
