"""Multi-latent attention (issue 12 item 4): MindFormers MLA checkpoints -> Megatron MLA, checked against an
independent HF-style (DeepSeek-V3 names) unfused truth, megatron-core strict loads and a logits check.

Fixtures follow MindFormers master f52743ca mindformers/parallel_core/training_graph/transformer/
multi_latent_attention.py (mindformers-moe-mla-distributed.md §2.1): `concat` = `mla_qkv_concat: True`
(`linear_qkv` = [q_a; kv_a_with_mqa], `linear_qb`, `linear_kvb`, `q_layernorm`, `k_layernorm`), `split` =
`mla_qkv_concat: False` (Megatron names), and both without q compression (`linear_q_proj` / fused
[q_proj; kv_a]). Dense SwiGLU MLP written [gate; up] (`--fc1-layout gate-up`), plus one MTP key.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.converter import megatron_consumer as mc
from tests.families.runner import convert, load_rank_files

H, NH, QL, KL, DQK, DR, DV, FFN, VOCAB, LAYERS = 32, 4, 24, 16, 8, 4, 6, 48, 64, 4
TORCH = torch.float32


def _truth(lora: bool, seed: int = 0) -> dict[str, torch.Tensor]:
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


def _mindformers(t: dict[str, torch.Tensor], lora: bool, concat: bool) -> dict[str, torch.Tensor]:
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


VARIANTS = {"concat": (True, True), "split": (True, False), "concat-noq": (False, True), "split-noq": (False, False)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    out = {}
    for name, (lora, concat) in VARIANTS.items():
        d = tmp_path_factory.mktemp(name)
        truth = _truth(lora)
        save_file(_mindformers(truth, lora, concat), str(d / "model.safetensors"), metadata={"format": "ms"})
        out[name] = (d, truth)
    return out


def _flags(name: str) -> list[str]:
    flags = ["--num-attention-heads", str(NH), "--rope-type", "rope", "--fc1-layout", "gate-up",
             "--dtype", "fp32", "--norm-epsilon", "1e-6", "--rotary-base", "10000", "--seq-length", "64"]
    return flags + (["--qk-pos-emb-head-dim", str(DR)] if name == "concat-noq" else [])


def _run(src: Path, save: Path, *extra: str) -> None:
    done = convert("--load-dir", str(src), "--save-dir", str(save), *extra)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize(("tp", "pp", "impl"), [(1, 1, "local"), (2, 2, "local"), (2, 1, "transformer_engine")])
def test_ranks_match_truth(sources: dict, tmp_path: Path, name: str, tp: int, pp: int, impl: str) -> None:
    src, truth = sources[name]
    lora = VARIANTS[name][0]
    save = tmp_path / "out"
    _run(src, save, *_flags(name), "--tp", str(tp), "--pp", str(pp), "--saver-transformer-impl", impl)
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
        _run(src, save, *_flags(name), "--tp", str(tp), "--pp", str(pp))
        mc.load_all_ranks_strict(mc.open_checkpoint(save), te="final-norm")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    want = _reference_logits(truth, ids, lora)
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
        _run(src, tmp_path / name, *_flags(name), "--tp", "2", "--no-final-norm-extra-state")
        dirs.append(tmp_path / name)
        wants.append(_reference_logits(truth, ids, VARIANTS[name][0]))
    for got, want in zip(mc.logits_multiprocess(dirs, ids), wants, strict=True):
        assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """DeepSeek MLA RoPE on x [b, s, n, DR]: pairs (2i, 2i+1) rotated by theta_i (as a complex product)."""
    inv = 1.0 / (10000 ** (torch.arange(0, DR, 2).float() / DR))
    ang = pos[:, :, None, None].float() * inv  # [b, s, 1, DR/2]
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], dim=-1)  # megatron's de-interleaved order; q.k is order-invariant


def _reference_logits(t: dict[str, torch.Tensor], ids: torch.Tensor, lora: bool) -> torch.Tensor:
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


def _plan(src: Path, tp: int = 1, **model: object):
    from ms2mg_converter.config import ConvertConfig, Fc1Layout, LayoutConfig, ModelOverrides
    from ms2mg_converter.plan import build_plan

    base: dict[str, object] = {"num_attention_heads": NH, "rope_type": "rope"}
    values = {k: v for k, v in (base | model).items() if v is not None}
    return build_plan(ConvertConfig(load_dir=src, tensor_parallel=tp, model=ModelOverrides(**values),
                                    layouts=LayoutConfig(fc1=Fc1Layout.GATE_UP)))


@pytest.mark.parametrize(("name", "model", "error", "message"), [
    ("concat", {"num_attention_heads": None}, "UsageError", "attention heads of a multi-latent"),
    ("concat", {"rope_type": None}, "UsageError", "--rope-type"),
    ("concat-noq", {}, "UsageError", "--qk-pos-emb-head-dim"),
    ("concat", {"q_lora_rank": 99}, "ShapeError", "--q-lora-rank 99 but the tensors say 24"),
    ("split", {"v_head_dim": 7}, "ShapeError", "--v-head-dim 7 but the tensors say 6"),
    ("split", {"num_attention_heads": 5}, "ShapeError", "not a multiple of the 5 attention heads"),
])
def test_bad_mla_input_is_refused_clearly(sources: dict, name: str, model: dict, error: str, message: str) -> None:
    from ms2mg_converter import errors

    with pytest.raises(getattr(errors, error), match=message.replace("-", r"\-")):
        _plan(sources[name][0], **model)


def test_yarn_facts_defaulted_and_stored(sources: dict) -> None:
    plan = _plan(sources["split"][0], rope_type="yarn", rotary_scaling_factor=4.0)
    assert {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings"} <= set(
        plan.arch.defaulted)
    assert "rotary_scaling_factor" not in plan.arch.defaulted
    assert (plan.args["rope_type"], plan.args["rotary_scaling_factor"], plan.args["beta_fast"]) == ("yarn", 4.0, 32.0)
    from ms2mg_converter.model.facts import describe_defaulted

    assert "beta_fast=32.0" in describe_defaulted(plan.arch)


def test_mla_split_must_divide() -> None:
    """Local spec: the down projections are split by rows, so q_lora_rank and kv_lora_rank + qk_pos_emb_head_dim
    must divide by TP; the TE spec replicates them (no rule)."""
    from ms2mg_converter.model.mla import MlaDims, mla_parallel_problems

    dims = MlaDims(heads=8, q_lora_rank=20, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6,
                   rope_type="rope", rotary_scaling_factor=40, original_max_position_embeddings=4096, beta_fast=32,
                   beta_slow=1, mscale=1, mscale_all_dim=0)
    problems = mla_parallel_problems(dims, 8, down_split=True)
    assert len(problems) == 2 and "kv_lora_rank + qk_pos_emb_head_dim (20)" in problems[0]
    assert "q_lora_rank (20)" in problems[1]
    assert mla_parallel_problems(dims, 8, down_split=False) == []
    assert mla_parallel_problems(dims, 4, down_split=True) == []


def test_layer_missing_kv_layernorm(tmp_path: Path) -> None:
    from ms2mg_converter import errors

    mf = _mindformers(_truth(True), True, False)
    del mf["decoder.layers.2.self_attention.kv_layernorm.weight"]
    save_file(mf, str(tmp_path / "model.safetensors"))
    with pytest.raises(errors.MissingKeyError, match="layer 2"):
        _plan(tmp_path)


def test_yaml_states_mla_facts(sources: dict, tmp_path: Path) -> None:
    """A MindFormers mcore YAML (`multi_latent_attention: True`, `position_embedding_type: yarn`,
    `rotary_scaling_factor`) and an HF-style `rope_scaling` block both state the RoPE facts."""
    from ms2mg_converter.config import ConvertConfig, Fc1Layout, LayoutConfig
    from ms2mg_converter.plan import build_plan

    mcore = tmp_path / "mcore.yaml"
    mcore.write_text("model:\n  model_config:\n    num_attention_heads: 4\n    multi_latent_attention: True\n"
                     "    position_embedding_type: \"yarn\"\n    rotary_scaling_factor: 64.0\n    q_lora_rank: 24\n"
                     "    qk_rope_head_dim: 4\n    mscale: 0.707\n", encoding="utf-8")
    hf = tmp_path / "hf.yaml"
    hf.write_text("model:\n  model_config:\n    num_attention_heads: 4\n    rope_scaling:\n      type: yarn\n"
                  "      factor: 40\n      beta_fast: 32\n      beta_slow: 1\n      mscale: 1.0\n"
                  "      mscale_all_dim: 1.0\n      original_max_position_embeddings: 4096\n", encoding="utf-8")
    for yaml_file, factor, defaulted in ((mcore, 64.0, True), (hf, 40.0, False)):
        plan = build_plan(ConvertConfig(load_dir=sources["concat"][0], config_yaml=yaml_file,
                                        layouts=LayoutConfig(fc1=Fc1Layout.GATE_UP)))
        assert plan.arch.mla is not None and plan.arch.mla.rope_type == "yarn"
        assert plan.arch.mla.rotary_scaling_factor == factor
        assert ("beta_fast" in plan.arch.defaulted) is defaulted


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ms2mg_converter verify ARGS`."""
    return subprocess.run([sys.executable, "-m", "ms2mg_converter", "verify", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_verify_rebuilds_mla_tensors_from_the_fused_source(sources: dict, tmp_path: Path) -> None:
    """`ms2mg verify` rebuilds the split of the fused linear_qkv from the source and finds a changed value."""
    from ms2mg_converter.verify.ckptfile import peek
    src, _ = sources["concat"]
    save = tmp_path / "out"
    _run(src, save, *_flags("concat"), "--tp", "2")
    assert verify("--load-dir", str(src), "--save-dir", str(save)).returncode == 0
    path = save / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    rf = peek(path)
    stored = rf.content["model"]["decoder.layers.1.self_attention.linear_kv_down_proj.weight"]
    start, _ = rf.data_offsets[f"{rf.prefix}/{stored.record}"]
    raw = bytearray(path.read_bytes())
    raw[start + 4] ^= 0x40
    path.write_bytes(bytes(raw))
    done = verify("--load-dir", str(src), "--save-dir", str(save))
    assert done.returncode == 5
    assert "MISMATCH" in done.stdout and "decoder.layers.1.self_attention.linear_kv_down_proj.weight" in done.stdout


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
            _run(src, save, *_flags(name), "--pp", str(pp), "--saver-transformer-impl", "transformer_engine")
            got = mc.logits_in_process(mc.open_checkpoint(save), ids, te="te-names")
            want = _reference_logits(truth, ids, VARIANTS[name][0])
            assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()


def _back_to_mindformers(merged: dict[str, torch.Tensor], concat: bool) -> dict[str, torch.Tensor]:
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
    source = {k: v for k, v in _mindformers(truth, lora, concat).items() if not k.startswith("mtp.")}
    for tp, pp, impl in ((2, 2, "local"), (2, 1, "transformer_engine")):
        save = tmp_path / f"{tp}-{pp}-{impl}"
        _run(src, save, *_flags(name), "--tp", str(tp), "--pp", str(pp), "--saver-transformer-impl", impl,
             "--no-final-norm-extra-state")
        merged, _ = merge_checkpoint(save)
        back = _back_to_mindformers(merged, concat)
        assert sorted(back) == sorted(source)
        assert all(torch.equal(back[k], source[k]) for k in source), [k for k in source if not torch.equal(
            back[k], source[k])]
