"""The independent "HF-style" truth of a small model: separate q/k/v, gate/up, norms and biases.

Every family fixture fuses this truth into MindFormers' names and layouts; `expected.py` fuses the same
truth into Megatron's. Nothing here knows either layout. Values come from a seeded torch generator and are
rounded to the dtype MindFormers stores (`Dims.dtype`, `Dims.embed_dtype`), so the expected bf16 output is
one rounding of the stored value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Dims:
    """Shape and features of a small model (GQA, vocab not a multiple of 128)."""

    layers: int = 4
    hidden: int = 64
    heads: int = 8
    groups: int = 2
    head_dim: int = 8
    ffn: int = 96
    vocab: int = 300
    swiglu: bool = True
    qkv_bias: bool = False
    """Bias on q/k/v only (Qwen2 style)."""
    linear_bias: bool = False
    """Bias on every linear: q/k/v, o, fc1 (gate/up), down."""
    out_bias: bool = False
    """Bias on o and down only (TeleChat2)."""
    qk_norm: bool = False
    layernorm: bool = False
    """LayerNorm (weight and bias) instead of RMSNorm (weight only)."""
    tied: bool = False
    dtype: torch.dtype = torch.float32
    embed_dtype: torch.dtype | None = None
    """Storage dtype of the embedding table when it differs from `dtype` (Llama-3: bf16 beside fp16)."""


@dataclass(frozen=True)
class Truth:
    """HF-style tensors. Keys: `embed`, `lm_head`, `norm.{weight,bias}`, and per layer `L.<name>`."""

    dims: Dims
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get(self, key: str) -> torch.Tensor | None:
        return self.tensors.get(key)

    def layer(self, i: int, name: str) -> torch.Tensor:
        return self.tensors[f"{i}.{name}"]

    def layer_opt(self, i: int, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"{i}.{name}")


def _shapes_norm(d: Dims, prefix: str, size: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {f"{prefix}.weight": (size,)}
    if d.layernorm:
        out[f"{prefix}.bias"] = (size,)
    return out


def _layer_shapes(d: Dims, i: int) -> dict[str, tuple[int, ...]]:
    h, q_rows, kv_rows = d.hidden, d.heads * d.head_dim, d.groups * d.head_dim
    s: dict[str, tuple[int, ...]] = {}
    s.update(_shapes_norm(d, f"{i}.input_norm", h))
    s.update({f"{i}.q.weight": (q_rows, h), f"{i}.k.weight": (kv_rows, h), f"{i}.v.weight": (kv_rows, h),
              f"{i}.o.weight": (h, q_rows)})
    if d.qkv_bias or d.linear_bias:
        s.update({f"{i}.q.bias": (q_rows,), f"{i}.k.bias": (kv_rows,), f"{i}.v.bias": (kv_rows,)})
    if d.qk_norm:
        s.update({f"{i}.q_norm.weight": (d.head_dim,), f"{i}.k_norm.weight": (d.head_dim,)})
    s.update(_shapes_norm(d, f"{i}.post_norm", h))
    fc1 = ("gate", "up") if d.swiglu else ("up",)
    s.update({f"{i}.{n}.weight": (d.ffn, h) for n in fc1})
    s[f"{i}.down.weight"] = (h, d.ffn)
    if d.linear_bias:
        s.update({f"{i}.{n}.bias": (d.ffn,) for n in fc1})
    if d.linear_bias or d.out_bias:
        s.update({f"{i}.o.bias": (h,), f"{i}.down.bias": (h,)})
    return s


def shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """Every truth tensor's name and shape."""
    s: dict[str, tuple[int, ...]] = {"embed": (d.vocab, d.hidden)}
    for i in range(d.layers):
        s.update(_layer_shapes(d, i))
    s.update(_shapes_norm(d, "norm", d.hidden))
    if not d.tied:
        s["lm_head"] = (d.vocab, d.hidden)
    return s


def make_truth(d: Dims, seed: int) -> Truth:
    """Seeded random tensors; norm weights near 1. Rounded to the MindFormers storage dtype."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes(d).items():
        t = torch.randn(shape, generator=gen)
        if "norm" in name and name.endswith(".weight"):
            t = 1.0 + 0.1 * t
        dtype = d.embed_dtype if name == "embed" and d.embed_dtype is not None else d.dtype
        tensors[name] = t.to(dtype)
    return Truth(d, tensors)
