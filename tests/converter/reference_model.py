"""An independent plain-torch GPT forward pass over the *logical* sample weights (fp32).

It reads the separate q/k/v and gate/up projections of `ms2mg_converter.demo.sample.logical_weights`, never a
fused or sharded Megatron tensor, so it shares no layout code with the converter or the test sharder.
It follows what megatron-core 0.16.1's GPTModel (local spec) computes:

* embedding, plus learned absolute position embeddings when present (no embedding scaling);
* per layer, pre-norm: `x + proj(attn(norm1(x)))`, then `x + fc2(act(fc1(norm2(x))))`;
* RMSNorm / LayerNorm with eps 1e-5 (`TransformerConfig.layernorm_epsilon`);
* q/k layernorm per head *before* RoPE (`SelfAttention.get_query_key_value_tensors` applies
  `q_layernorm` / `k_layernorm`; `Attention.forward` applies the rotary embedding afterwards);
* RoPE rotate-half (`rotary_interleaved=False`), base 10000 unless given, rotary_percent 1.0, positions 0..s-1,
  applied to q and k;
* grouped-query causal attention, scale 1/sqrt(head_dim), query head j reads KV head j // (nh/ng);
* SwiGLU `silu(gate) * up`, or exact (erf) GELU without SwiGLU (TransformerConfig's default activation);
* final norm and logits `x @ W^T`, W = `lm_head.weight`, or the embedding when tied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ms2mg_converter.demo.sample import SampleSpec

EPS = 1e-5
ROTARY_BASE = 10000.0


def _norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, spec: SampleSpec) -> torch.Tensor:
    weight = w[f"{name}.weight"]
    if spec.normalization == "LayerNorm":
        return F.layer_norm(x, (x.shape[-1],), weight, w[f"{name}.bias"], EPS)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x: [b, heads, s, d]; rotate-half RoPE over the whole head dim."""
    s, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def _attention(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, spec: SampleSpec,
               rotary_base: float) -> torch.Tensor:
    b, s, _ = x.shape
    nh, ng, d = spec.num_attention_heads, spec.num_query_groups, spec.head_dim
    q = _linear(x, w, p + "q_proj").view(b, s, nh, d)
    k = _linear(x, w, p + "k_proj").view(b, s, ng, d)
    v = _linear(x, w, p + "v_proj").view(b, s, ng, d)
    if spec.qk_layernorm:
        q = _norm(q, w, p + "q_norm", spec)
        k = _norm(k, w, p + "k_norm", spec)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
    if spec.position_embedding_type == "rope":
        q, k = _rope(q, rotary_base), _rope(k, rotary_base)
    rep = nh // ng
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, s, nh * d)
    return _linear(out, w, p + "o_proj")


def _mlp(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, spec: SampleSpec) -> torch.Tensor:
    if spec.swiglu:
        hidden = F.silu(_linear(x, w, p + "gate_proj")) * _linear(x, w, p + "up_proj")
    else:
        hidden = F.gelu(_linear(x, w, p + "up_proj"))
    return _linear(hidden, w, p + "down_proj")


@torch.no_grad()
def reference_logits(weights: dict[str, torch.Tensor], spec: SampleSpec, input_ids: torch.Tensor,
                     rotary_base: float = ROTARY_BASE) -> torch.Tensor:
    """Logits `[b, s, vocab]` (fp32) of the sample model `spec`, logical `weights`, `input_ids` `[b, s]`; the
    model was trained with RoPE base `rotary_base`."""
    w = {k: v.float() for k, v in weights.items()}
    s = input_ids.shape[1]
    x = F.embedding(input_ids, w["model.embed_tokens.weight"])
    if spec.position_embedding_type == "learned_absolute":
        x = x + w["model.embed_positions.weight"][:s]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        x = x + _attention(_norm(x, w, p + "input_layernorm", spec), w, p + "self_attn.", spec, rotary_base)
        x = x + _mlp(_norm(x, w, p + "post_attention_layernorm", spec), w, p + "mlp.", spec)
    x = _norm(x, w, "model.norm", spec)
    head = w["model.embed_tokens.weight"] if spec.tied else w["lm_head.weight"]
    return x @ head.T


def rounded(weights: dict[str, torch.Tensor], spec: SampleSpec) -> dict[str, torch.Tensor]:
    """The logical weights as the sample file stores them: rounded to `spec.dtype`, back in fp32."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.dtype]
    return {k: v.to(dtype).float() for k, v in weights.items()}
