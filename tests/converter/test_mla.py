"""Multi-latent attention (issue 12 item 4): MindFormers MLA checkpoints -> Megatron MLA, checked against an
independent HF-style (DeepSeek-V3 names) unfused truth, megatron-core strict loads and a logits check.

Fixtures (tests/converter/mla_fixture.py) follow MindFormers master f52743ca
mindformers/parallel_core/training_graph/transformer/multi_latent_attention.py (mindformers-moe-mla-distributed.md
§2.1): `concat` = `mla_qkv_concat: True`
(`linear_qkv` = [q_a; kv_a_with_mqa], `linear_qb`, `linear_kvb`, `q_layernorm`, `k_layernorm`), `split` =
`mla_qkv_concat: False` (Megatron names), and both without q compression (`linear_q_proj` / fused
[q_proj; kv_a]). Dense SwiGLU MLP written [gate; up] (`--fc1-layout gate-up`), plus one MTP key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.converter import megatron_consumer as mc
from tests.converter.mla_fixture import (
    DQK,
    DR,
    DV,
    KL,
    LAYERS,
    QL,
    VARIANTS,
    VOCAB,
    mindformers_tensors,
    mla_flags,
    reference_logits,
    run_convert,
    sources,
)
from tests.families.runner import load_rank_files

__all__ = ["sources"]  # the module fixture, used by name


def _expected_rank(t: dict[str, torch.Tensor], lora: bool, tp: int, r: int, te: bool) -> dict[str, torch.Tensor]:
    """Megatron's TP1 names from the truth, split as megatron-core shapes them (test's own rules)."""
    col = lambda x: torch.chunk(x, tp)[r]  # noqa: E731
    down = (lambda x: x) if te else col
    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": col(t["model.embed_tokens.weight"]),
                                    "decoder.final_layernorm.weight": t["model.norm.weight"],
                                    "output_layer.weight": col(t["lm_head.weight"])}
    for i in range(LAYERS):
        p, a = f"model.layers.{i}.", f"decoder.layers.{i}.self_attention."
        if lora:
            out[a + "linear_q_down_proj.weight"] = down(t[p + "self_attn.q_a_proj.weight"])
            out[a + "linear_q_up_proj.weight"] = col(t[p + "self_attn.q_b_proj.weight"])
            qn = a + ("linear_q_up_proj.layer_norm_weight" if te else "q_layernorm.weight")
            out[qn] = t[p + "self_attn.q_a_layernorm.weight"]
        else:
            out[a + "linear_q_proj.weight"] = col(t[p + "self_attn.q_proj.weight"])
        out[a + "linear_kv_down_proj.weight"] = down(t[p + "self_attn.kv_a_proj_with_mqa.weight"])
        out[a + "linear_kv_up_proj.weight"] = col(t[p + "self_attn.kv_b_proj.weight"])
        kn = a + ("linear_kv_up_proj.layer_norm_weight" if te else "kv_layernorm.weight")
        out[kn] = t[p + "self_attn.kv_a_layernorm.weight"]
        out[a + "linear_proj.weight"] = torch.chunk(t[p + "self_attn.o_proj.weight"], tp, dim=1)[r]
        out[f"decoder.layers.{i}.input_layernorm.weight"] = t[p + "input_layernorm.weight"]
        mlp = f"decoder.layers.{i}.mlp."
        mlp_norm = mlp + "linear_fc1.layer_norm_weight" if te else f"decoder.layers.{i}.pre_mlp_layernorm.weight"
        out[mlp_norm] = t[p + "post_attention_layernorm.weight"]
        gate, up = col(t[p + "mlp.gate_proj.weight"]), col(t[p + "mlp.up_proj.weight"])
        out[mlp + "linear_fc1.weight"] = torch.cat([gate, up])
        out[mlp + "linear_fc2.weight"] = torch.chunk(t[p + "mlp.down_proj.weight"], tp, dim=1)[r]
    return out

@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize(("tp", "pp", "impl"), [(1, 1, "local"), (2, 2, "local"), (2, 1, "transformer_engine")])
def test_ranks_matchtruth_tensors(sources: dict, tmp_path: Path, name: str, tp: int, pp: int, impl: str) -> None:
    src, truth = sources[name]
    lora = VARIANTS[name][0]
    save = tmp_path / "out"
    run_convert(src, save, *mla_flags(name), "--tp", str(tp), "--pp", str(pp), "--saver-transformer-impl", impl)
    files = load_rank_files(save)
    te = impl == "transformer_engine"
    for r in range(tp):
        want = _expected_rank(truth, lora, tp, r, te)
        got: dict[str, torch.Tensor] = {}
        for p in range(pp):
            sd = files[f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{p:03d}"]["model"]
            per = LAYERS // pp
            for k, v in sd.items():
                if v is None:
                    continue
                if k.startswith("decoder.layers."):
                    j, rest = k[len("decoder.layers."):].split(".", 1)
                    k = f"decoder.layers.{int(j) + p * per}.{rest}"
                got[k] = v
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    args = files[sorted(files)[0]]["args"]
    assert args.multi_latent_attention and args.kv_lora_rank == KL and args.qk_head_dim == DQK
    assert (args.qk_pos_emb_head_dim, args.v_head_dim, args.q_lora_rank) == (DR, DV, QL if lora else None)
    manifest = json.loads((save / "ms2mg-manifest.json").read_text())
    assert manifest["dropped_keys"] == ["mtp.layers.0.enorm.weight"]  # MTP: dropped and listed
    assert manifest["architecture"]["mla"]["kv_lora_rank"] == KL


@pytest.mark.parametrize("name", ["concat", "split-noq"])
def test_megatron_strict_load_and_logits(sources: dict, tmp_path: Path, name: str) -> None:
    """Every rank strict-loads into megatron-core's MLA GPTModel (approach C); logits at TP1 and PP2 match the
    independent reference. megatron-core 0.16.1 builds `linear_q_proj` without the `tp_group` it gives every
    other linear, so with fake in-process groups it is full size: a TP2 `linear_q_proj` is loaded by
    `test_megatron_tp2_logits` on real gloo ranks instead."""
    src, truth = sources[name]
    lora = VARIANTS[name][0]
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)) if lora else ((1, 1), (1, 2)):
        save = tmp_path / f"tp{tp}pp{pp}"
        run_convert(src, save, *mla_flags(name), "--tp", str(tp), "--pp", str(pp))
        mc.load_all_ranks_strict(mc.open_checkpoint(save), te="final-norm")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    want = reference_logits(truth, ids, lora)
    for tp, pp in ((1, 1), (1, 2)):
        got = mc.logits_in_process(mc.open_checkpoint(tmp_path / f"tp{tp}pp{pp}"), ids, te="final-norm")
        assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()


def test_megatron_tp2_logits(sources: dict, tmp_path: Path) -> None:
    """TP2 on two real gloo ranks (strict load on real process groups, vocab-parallel logits gathered), for
    both the q-compressed (split down projections) and the linear_q_proj variant."""
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    dirs, wants = [], []
    for name in ("concat", "split-noq"):
        src, truth = sources[name]
        run_convert(src, tmp_path / name, *mla_flags(name), "--tp", "2", "--no-final-norm-extra-state")
        dirs.append(tmp_path / name)
        wants.append(reference_logits(truth, ids, VARIANTS[name][0]))
    for got, want in zip(mc.logits_multiprocess(dirs, ids), wants, strict=True):
        assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()

def test_te_names_load_into_megatron_and_match_logits(sources: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`--saver-transformer-impl transformer_engine` at TP1: megatron-core's own TE->local mapping
    (`mcore_gpt_load_te_state_dict_pre_hook`: `linear_q_up_proj.layer_norm_weight` -> `q_layernorm.weight`, ...)
    loads every rank strictly, TE's `_extra_state` on the separate input TENorm and the core attention, and the
    logits match the reference."""
    original = mc.te_like

    def te_like_mla(model: object, spec: str) -> object:
        model = original(model, spec)
        for layer in model.decoder.layers:  # type: ignore[attr-defined]
            mc.with_te_extra_state(layer.input_layernorm)  # MLA under TE: a separate TENorm
        return model

    monkeypatch.setattr(mc, "te_like", te_like_mla)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    for name in ("concat", "split-noq"):
        src, truth = sources[name]
        for pp in (1, 2):
            save = tmp_path / f"{name}-{pp}"
            run_convert(src, save, *mla_flags(name), "--pp", str(pp), "--saver-transformer-impl", "transformer_engine")
            got = mc.logits_in_process(mc.open_checkpoint(save), ids, te="te-names")
            want = reference_logits(truth, ids, VARIANTS[name][0])
            assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()


def _back_tomindformers_tensors(merged: dict[str, torch.Tensor], concat: bool) -> dict[str, torch.Tensor]:
    """Megatron TP1 tensors -> MindFormers' names and fused layout, with the layout operations' inverses."""
    from ms2mg_converter.layout import MlaFusedKv, MlaFusedQ, fuse_qkv

    out = dict(merged)
    if not concat:
        return out
    for i in range(LAYERS):
        a = f"decoder.layers.{i}.self_attention."
        q_name = a + ("linear_q_down_proj.weight" if a + "linear_q_down_proj.weight" in out else "linear_q_proj.weight")
        q, kv = out.pop(q_name), out.pop(a + "linear_kv_down_proj.weight")
        total = q.shape[0] + kv.shape[0]
        (q_back,), (kv_back,) = MlaFusedQ(q.shape[0], total).invert(q), MlaFusedKv(q.shape[0], total).invert(kv)
        out[a + "linear_qkv.weight"] = fuse_qkv(q_back, kv_back)
        out[a + "linear_kvb.weight"] = out.pop(a + "linear_kv_up_proj.weight")
        out[a + "k_layernorm.weight"] = out.pop(a + "kv_layernorm.weight")
        if a + "linear_q_up_proj.weight" in out:
            out[a + "linear_qb.weight"] = out.pop(a + "linear_q_up_proj.weight")
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_restores_the_source(sources: dict, tmp_path: Path, name: str) -> None:
    """Convert (TP2 x PP2 local, TP2 TE), re-merge with Megatron's rules (tests/converter/roundtrip.py), undo
    the layout ops: the MindFormers source comes back bit for bit (fp32), MTP aside."""
    from tests.converter.roundtrip import merge_checkpoint

    src, truth = sources[name]
    lora, concat = VARIANTS[name]
    source = {k: v for k, v in mindformers_tensors(truth, lora, concat).items() if not k.startswith("mtp.")}
    for tp, pp, impl in ((2, 2, "local"), (2, 1, "transformer_engine")):
        save = tmp_path / f"{tp}-{pp}-{impl}"
        run_convert(src, save, *mla_flags(name), "--tp", str(tp), "--pp", str(pp), "--saver-transformer-impl", impl,
             "--no-final-norm-extra-state")
        merged, _ = merge_checkpoint(save)
        back = _back_tomindformers_tensors(merged, concat)
        assert sorted(back) == sorted(source)
        assert all(torch.equal(back[k], source[k]) for k in source), [k for k in source if not torch.equal(
            back[k], source[k])]
