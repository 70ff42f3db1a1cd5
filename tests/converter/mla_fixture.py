"""Shared MLA test material: an independent HF-style (DeepSeek-V3 names) unfused truth, the same model as
MindFormers' training graph saves it (both `mla_qkv_concat` variants, with and without q compression), the
conversion flags, and a plain-torch DeepSeek forward that shares no code with the converter or megatron.

Fixtures follow MindFormers master f52743ca mindformers/parallel_core/training_graph/transformer/
multi_latent_attention.py (mindformers-moe-mla-distributed.md §2.1). Dense SwiGLU MLP written [gate; up]
(`--fc1-layout gate-up`), plus one MTP key (`mtp.layers.0.enorm.weight`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.families.runner import convert

H, NH, QL, KL, DQK, DR, DV, FFN, VOCAB, LAYERS = 32, 4, 24, 16, 8, 4, 6, 48, 64, 4
TORCH = torch.float32


def truth_tensors(lora: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 HF names (modeling_deepseek.py), unfused, random."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    t = {"model.embed_tokens.weight": r(VOCAB, H), "model.norm.weight": 1 + r(H), "lm_head.weight": r(VOCAB, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        if lora:
            t |= {p + "self_attn.q_a_proj.weight": r(QL, H), p + "self_attn.q_a_layernorm.weight": 1 + r(QL),
                  p + "self_attn.q_b_proj.weight": r(NH * (DQK + DR), QL)}
        else:
            t[p + "self_attn.q_proj.weight"] = r(NH * (DQK + DR), H)
        t |= {p + "self_attn.kv_a_proj_with_mqa.weight": r(KL + DR, H),
              p + "self_attn.kv_a_layernorm.weight": 1 + r(KL),
              p + "self_attn.kv_b_proj.weight": r(NH * (DQK + DV), KL), p + "self_attn.o_proj.weight": r(H, NH * DV),
              p + "input_layernorm.weight": 1 + r(H), p + "post_attention_layernorm.weight": 1 + r(H),
              p + "mlp.gate_proj.weight": r(FFN, H), p + "mlp.up_proj.weight": r(FFN, H),
              p + "mlp.down_proj.weight": r(H, FFN)}
    return t


def mindformers_tensors(t: dict[str, torch.Tensor], lora: bool, concat: bool) -> dict[str, torch.Tensor]:
    """The truth as MindFormers' training graph saves it (this test's own fusing)."""
    out = {"embedding.word_embeddings.weight": t["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": t["model.norm.weight"], "output_layer.weight": t["lm_head.weight"],
           "mtp.layers.0.enorm.weight": torch.ones(H)}
    for i in range(LAYERS):
        p, d, a = f"model.layers.{i}.", f"decoder.layers.{i}.", f"decoder.layers.{i}.self_attention."
        q_in = t[p + "self_attn.q_a_proj.weight"] if lora else t[p + "self_attn.q_proj.weight"]
        if concat:
            out[a + "linear_qkv.weight"] = torch.cat([q_in, t[p + "self_attn.kv_a_proj_with_mqa.weight"]])
            out[a + "linear_kvb.weight"] = t[p + "self_attn.kv_b_proj.weight"]
            out[a + "k_layernorm.weight"] = t[p + "self_attn.kv_a_layernorm.weight"]
            if lora:
                out[a + "linear_qb.weight"] = t[p + "self_attn.q_b_proj.weight"]
        else:
            out[a + "linear_kv_down_proj.weight"] = t[p + "self_attn.kv_a_proj_with_mqa.weight"]
            out[a + "linear_kv_up_proj.weight"] = t[p + "self_attn.kv_b_proj.weight"]
            out[a + "kv_layernorm.weight"] = t[p + "self_attn.kv_a_layernorm.weight"]
            if lora:
                out[a + "linear_q_down_proj.weight"] = q_in
                out[a + "linear_q_up_proj.weight"] = t[p + "self_attn.q_b_proj.weight"]
            else:
                out[a + "linear_q_proj.weight"] = q_in
        if lora:
            out[a + "q_layernorm.weight"] = t[p + "self_attn.q_a_layernorm.weight"]
        out[a + "linear_proj.weight"] = t[p + "self_attn.o_proj.weight"]
        out[d + "input_layernorm.weight"] = t[p + "input_layernorm.weight"]
        out[d + "pre_mlp_layernorm.weight"] = t[p + "post_attention_layernorm.weight"]
        out[d + "mlp.linear_fc1.weight"] = torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])
        out[d + "mlp.linear_fc2.weight"] = t[p + "mlp.down_proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}

VARIANTS = {"concat": (True, True), "split": (True, False), "concat-noq": (False, True), "split-noq": (False, False)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    out = {}
    for name, (lora, concat) in VARIANTS.items():
        d = tmp_path_factory.mktemp(name)
        truth = truth_tensors(lora)
        save_file(mindformers_tensors(truth, lora, concat), str(d / "model.safetensors"), metadata={"format": "ms"})
        out[name] = (d, truth)
    return out


def mla_flags(name: str) -> list[str]:
    flags = ["--num-attention-heads", str(NH), "--rope-type", "rope", "--fc1-layout", "gate-up",
             "--dtype", "fp32", "--norm-epsilon", "1e-6", "--rotary-base", "10000", "--seq-length", "64"]
    return flags + (["--qk-pos-emb-head-dim", str(DR)] if name == "concat-noq" else [])


def run_convert(src: Path, save: Path, *extra: str) -> None:
    done = convert("--load-dir", str(src), "--save-dir", str(save), *extra)
    assert done.returncode == 0, done.stderr[-3000:]

def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """DeepSeek MLA RoPE on x [b, s, n, DR]: pairs (2i, 2i+1) rotated by theta_i (as a complex product)."""
    inv = 1.0 / (10000 ** (torch.arange(0, DR, 2).float() / DR))
    ang = pos[:, :, None, None].float() * inv  # [b, s, 1, DR/2]
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], dim=-1)  # megatron's de-interleaved order; q.k is order-invariant


def reference_logits(t: dict[str, torch.Tensor], ids: torch.Tensor, lora: bool) -> torch.Tensor:
    """A plain-torch DeepSeek-V3 forward (HF names), sharing no code with the converter or megatron."""
    b, s = ids.shape
    pos = torch.arange(s).expand(b, s)
    x = t["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn."
        n = _rms(x, t[f"model.layers.{i}.input_layernorm.weight"])
        if lora:
            q = _rms(n @ t[p + "q_a_proj.weight"].T, t[p + "q_a_layernorm.weight"]) @ t[p + "q_b_proj.weight"].T
        else:
            q = n @ t[p + "q_proj.weight"].T
        q = q.view(b, s, NH, DQK + DR)
        kv_a = n @ t[p + "kv_a_proj_with_mqa.weight"].T
        kv = _rms(kv_a[..., :KL], t[p + "kv_a_layernorm.weight"]) @ t[p + "kv_b_proj.weight"].T
        kv = kv.view(b, s, NH, DQK + DV)
        k_pe = _rope(kv_a[..., KL:].view(b, s, 1, DR), pos).expand(b, s, NH, DR)
        qq = torch.cat([q[..., :DQK], _rope(q[..., DQK:], pos)], -1).transpose(1, 2)
        kk = torch.cat([kv[..., :DQK], k_pe], -1).transpose(1, 2)
        vv = kv[..., DQK:].transpose(1, 2)
        att = (qq @ kk.transpose(-1, -2)) / math.sqrt(DQK + DR)
        att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + (att @ vv).transpose(1, 2).reshape(b, s, NH * DV) @ t[p + "o_proj.weight"].T
        m, mp = _rms(x, t[f"model.layers.{i}.post_attention_layernorm.weight"]), f"model.layers.{i}.mlp."
        act = F.silu(m @ t[mp + "gate_proj.weight"].T) * (m @ t[mp + "up_proj.weight"].T)
        x = x + act @ t[mp + "down_proj.weight"].T
    return _rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T
