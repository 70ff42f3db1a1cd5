"""DeepSeek-V3-style test material: multi-latent attention + MoE (first-k-dense layers, shared experts, router
expert bias, sigmoid scores, group-limited routing), built from the two independent truths
(tests/converter/mla_fixture.py for the attention and the dense layer, tests/moe/fixture.py for the MoE
layers), written with MindFormers' names, a plain-torch reference forward and a megatron-core 0.16.1 CPU
consumer (MLATransformerConfig + the MoE decoder block spec, local implementation).

Layers: layer 0 dense (`first_k_dense_replace: 1`), layers 1-3 MoE with 4 experts in 2 groups (top-1 group,
top-2 experts), one shared expert, expert bias. fc1 is written interleaved (`use_interleaved_weight_layout_mlp:
True`) for the dense and the shared MLP; experts as grouped `weight1`/`weight2` (r1.7 shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from tests.converter.mla_fixture import DQK, DR, DV, FFN, KL, LAYERS, NH, QL, VOCAB, H, _rms, _rope
from tests.converter.mla_fixture import mindformers_tensors as mla_mindformers
from tests.converter.mla_fixture import truth_tensors as mla_truth
from tests.moe.fixture import MoeDims, Tensors, _interleave, make_truth
from tests.moe.fixture import mindformers_tensors as moe_mindformers
from tests.moe.reference import _swiglu

D = MoeDims(layers=LAYERS, dense=1, hidden=H, heads=NH, ffn=FFN, experts=4, moe_ffn=16, shared=24, vocab=VOCAB)
GROUPS, GROUP_TOPK, TOPK_SCALE = 2, 1, 2.5
VARIANTS = {"concat": True, "split": False}
"""Name -> `mla_qkv_concat` (both with q compression, as DeepSeek-V3)."""


def truths() -> tuple[Tensors, Tensors]:
    """(MLA truth: HF names, every layer with a dense MLP; MoE truth: `{i}.router`, `{i}.e{x}.gate`, ...).
    Layer 0 takes its MLP from the first, layers >= 1 from the second."""
    return mla_truth(lora=True), make_truth(D, seed=1)


def mindformers_tensors(mla: Tensors, moe: Tensors, concat: bool) -> Tensors:
    out = mla_mindformers(mla, lora=True, concat=concat)
    g, u = mla["model.layers.0.mlp.gate_proj.weight"], mla["model.layers.0.mlp.up_proj.weight"]
    out["decoder.layers.0.mlp.linear_fc1.weight"] = _interleave(g, u)
    moe_out = moe_mindformers(D, moe)
    for i in range(D.dense, D.layers):
        p = f"decoder.layers.{i}.mlp."
        out = {k: v for k, v in out.items() if not k.startswith(p)}
        out |= {k: v for k, v in moe_out.items() if k.startswith(p)}
    return {k: v.contiguous() for k, v in out.items()}


def yaml_doc() -> dict[str, Any]:
    section = {
        "num_layers": LAYERS, "hidden_size": H, "num_attention_heads": NH, "ffn_hidden_size": FFN,
        "vocab_size": VOCAB, "seq_length": 64, "multi_latent_attention": True, "mla_qkv_concat": True,
        "position_embedding_type": "rope", "q_lora_rank": QL, "kv_lora_rank": KL, "qk_nope_head_dim": DQK,
        "qk_rope_head_dim": DR, "v_head_dim": DV, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "num_moe_experts": D.experts, "moe_ffn_hidden_size": D.moe_ffn, "first_k_dense_replace": D.dense,
        "moe_shared_expert_intermediate_size": D.shared, "num_experts_per_tok": D.topk,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
        "routed_scaling_factor": TOPK_SCALE, "n_group": GROUPS, "topk_group": GROUP_TOPK,
        "use_interleaved_weight_layout_mlp": True, "tie_word_embeddings": False,
    }
    return {"model": {"model_config": section}, "parallel_config": {"model_parallel": 1}}


def write_source(root: Path, concat: bool) -> tuple[Path, Path]:
    """(load dir, YAML) of the MindFormers DeepSeek checkpoint (plus one MTP key, dropped by the converter)."""
    src = root / "mf"
    src.mkdir(parents=True, exist_ok=True)
    tensors = mindformers_tensors(*truths(), concat)
    tensors["mtp.layers.0.enorm.weight"] = torch.ones(H)
    save_file(tensors, str(src / "model.safetensors"))
    doc = yaml_doc()
    doc["model"]["model_config"]["mla_qkv_concat"] = concat
    cfg = root / "model.yaml"
    cfg.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return src, cfg


# ------------------------------------------------------------------------------------ plain-torch reference

def _mla(x: torch.Tensor, t: Tensors, i: int) -> torch.Tensor:
    """DeepSeek-V3 attention of x [s, h] (HF names), q compressed."""
    s, p = x.shape[0], f"model.layers.{i}.self_attn."
    pos = torch.arange(s)[None]
    q = _rms(x @ t[p + "q_a_proj.weight"].T, t[p + "q_a_layernorm.weight"]) @ t[p + "q_b_proj.weight"].T
    q = q.view(1, s, NH, DQK + DR)
    kv_a = x @ t[p + "kv_a_proj_with_mqa.weight"].T
    kv = (_rms(kv_a[..., :KL], t[p + "kv_a_layernorm.weight"]) @ t[p + "kv_b_proj.weight"].T).view(1, s, NH, -1)
    k_pe = _rope(kv_a[..., KL:].view(1, s, 1, DR), pos).expand(1, s, NH, DR)
    qq = torch.cat([q[..., :DQK], _rope(q[..., DQK:], pos)], -1)[0].transpose(0, 1)
    kk = torch.cat([kv[..., :DQK], k_pe], -1)[0].transpose(0, 1)
    vv = kv[0, :, :, DQK:].transpose(0, 1)
    att = (qq @ kk.transpose(-1, -2)) / math.sqrt(DQK + DR)
    att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return (att @ vv).transpose(0, 1).reshape(s, NH * DV) @ t[p + "o_proj.weight"].T


def _route(x: torch.Tensor, t: Tensors, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen experts, their weights) [s, topk]: sigmoid scores; groups ranked by the sum of their top
    (topk / group_topk) biased scores, experts outside the best `GROUP_TOPK` groups excluded, top-k on the
    biased scores; weights = unbiased scores of the chosen, renormalised, times the scaling factor."""
    scores = torch.sigmoid(F.linear(x, t[f"{i}.router"]))
    biased = (scores + t[f"{i}.expert_bias"]).view(x.shape[0], GROUPS, -1)
    group_score = biased.topk(D.topk // GROUP_TOPK, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(GROUP_TOPK, dim=-1).indices, True)
    masked = biased.masked_fill(~keep[..., None], float("-inf")).view(x.shape[0], -1)
    chosen = masked.topk(D.topk, dim=-1).indices
    probs = torch.gather(scores, 1, chosen)
    return chosen, probs / probs.sum(-1, keepdim=True) * TOPK_SCALE


def _moe(x: torch.Tensor, t: Tensors, i: int) -> torch.Tensor:
    chosen, probs = _route(x, t, i)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for slot in range(D.topk):
            e = int(chosen[n, slot])
            out[n] += probs[n, slot] * _swiglu(x[n:n + 1], t[f"{i}.e{e}.gate"], t[f"{i}.e{e}.up"],
                                               t[f"{i}.e{e}.down"])[0]
    return out + _swiglu(x, t[f"{i}.shared.gate"], t[f"{i}.shared.up"], t[f"{i}.shared.down"])


def reference_logits(mla: Tensors, moe: Tensors, ids: torch.Tensor) -> torch.Tensor:
    """Logits [s, vocab] of one sequence."""
    x = mla["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        x = x + _mla(_rms(x, mla[p + "input_layernorm.weight"]), mla, i)
        m = _rms(x, mla[p + "post_attention_layernorm.weight"])
        if i < D.dense:
            x = x + _swiglu(m, mla[p + "mlp.gate_proj.weight"], mla[p + "mlp.up_proj.weight"],
                            mla[p + "mlp.down_proj.weight"])
        else:
            x = x + _moe(m, moe, i)
    return _rms(x, mla["model.norm.weight"]) @ mla["lm_head.weight"].T


# ------------------------------------------------------------------------------- megatron-core consumer

def build_rank_model(args: argparse.Namespace, t: int, e: int, p: int, dtype: torch.dtype) -> Any:
    """GPTModel of rank (tp t, ep e, pp p): MLATransformerConfig with the MoE fields, the MoE decoder block spec
    with MLA (local), core attention replaced by tests/converter/mla_consumer.py's CPU `CausalAttention`."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.process_groups_config import ProcessGroupCollection

    from tests.converter.megatron_consumer import SizeOnlyGroup, ensure_single_process_state, te_like
    from tests.converter.mla_consumer import CausalAttention, mla_model_setup
    from tests.moe.consumer import config_from_args

    ensure_single_process_state()
    mla_config, kwargs = mla_model_setup(args, dtype, None)
    moe_config = config_from_args(args, dtype)
    names = {f.name for f in dataclasses.fields(moe_config) if f.init and f.name.startswith(("moe_", "num_moe",
                                                                                            "expert_"))}
    mla_config = dataclasses.replace(mla_config, **{k: getattr(moe_config, k) for k in names})
    spec = get_gpt_decoder_block_spec(mla_config, use_transformer_engine=False, normalization=args.normalization,
                                      pp_rank=p)
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = CausalAttention
    tp, ep, g = args.tensor_model_parallel_size, args.expert_model_parallel_size, SizeOnlyGroup
    pp = args.pipeline_model_parallel_size
    groups = ProcessGroupCollection(tp=g(tp, t), pp=g(pp, p), cp=g(1, 0), ep=g(ep, e), expt_tp=g(tp, t),
                                    expt_dp=g(1, 0), tp_ep=g(tp * ep, e * tp + t), tp_cp=g(tp, t), dp=g(1, 0),
                                    tp_dp_cp=g(tp, t), embd=None, pos_embd=None)
    kwargs["transformer_layer_spec"] = spec
    model = GPTModel(mla_config, pg_collection=groups, pre_process=p == 0, post_process=p == pp - 1, **kwargs)
    return te_like(model, "final-norm")
