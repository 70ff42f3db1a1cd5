"""A plain-torch forward pass of the MoE truth (tests/moe/fixture.py), fp32, written from what megatron-core
0.16.1 computes: pre-norm RMSNorm layers, GQA attention with rotate-half RoPE, SwiGLU; MoE layers route with
`topk_routing_with_score_function` (sigmoid scores, top-k chosen on score + expert bias, the chosen scores
renormalised and scaled by the top-k scaling factor), sum of the chosen experts' SwiGLU MLPs weighted by
their probabilities, plus the shared experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests.moe.fixture import MoeDims, Tensors

EPS, BASE, TOPK_SCALE = 1e-6, 1000000.0, 2.5


def _norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _rope(x: torch.Tensor) -> torch.Tensor:
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (BASE ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    emb = torch.cat([ang, ang], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def _attention(x: torch.Tensor, t: Tensors, i: int, d: MoeDims) -> torch.Tensor:
    s = x.shape[0]
    q = F.linear(x, t[f"{i}.q"]).view(s, d.heads, d.head_dim).transpose(0, 1)
    k = F.linear(x, t[f"{i}.k"]).view(s, d.groups, d.head_dim).transpose(0, 1)
    v = F.linear(x, t[f"{i}.v"]).view(s, d.groups, d.head_dim).transpose(0, 1)
    q, k = _rope(q), _rope(k)
    rep = d.heads // d.groups
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    att = (q @ k.transpose(1, 2)) / math.sqrt(d.head_dim)
    att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return F.linear((att @ v).transpose(0, 1).reshape(s, -1), t[f"{i}.o"])


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _moe(x: torch.Tensor, t: Tensors, i: int, d: MoeDims) -> torch.Tensor:
    scores = torch.sigmoid(F.linear(x, t[f"{i}.router"]))
    chosen = torch.topk(scores + t[f"{i}.expert_bias"], d.topk, dim=-1).indices
    probs = torch.gather(scores, 1, chosen)
    probs = probs / probs.sum(-1, keepdim=True) * TOPK_SCALE
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for slot in range(d.topk):
            e = int(chosen[n, slot])
            y = _swiglu(x[n:n + 1], t[f"{i}.e{e}.gate"], t[f"{i}.e{e}.up"], t[f"{i}.e{e}.down"])
            out[n] += probs[n, slot] * y[0]
    if d.shared:
        out = out + _swiglu(x, t[f"{i}.shared.gate"], t[f"{i}.shared.up"], t[f"{i}.shared.down"])
    return out


def reference_logits(t: Tensors, d: MoeDims, ids: torch.Tensor) -> torch.Tensor:
    """Logits [s, vocab] of one sequence."""
    x = t["embed"][ids]
    for i in range(d.layers):
        x = x + _attention(_norm(x, t[f"{i}.input_norm"]), t, i, d)
        h = _norm(x, t[f"{i}.post_norm"])
        x = x + (_swiglu(h, t[f"{i}.gate"], t[f"{i}.up"], t[f"{i}.down"]) if i < d.dense else _moe(h, t, i, d))
    return F.linear(_norm(x, t["norm"]), t["lm_head"])
