"""Multi-latent attention (MLA, DeepSeek-V2/V3): its sizes from the tensor shapes, its RoPE facts from flags.

Shapes (out, in; mindformers-moe-mla-distributed.md §2.1-2.2): `linear_q_down_proj [ql, h]` (or
`linear_q_proj [nh(dqk+dr), h]` without q compression), `linear_q_up_proj [nh(dqk+dr), ql]`,
`linear_kv_down_proj [kl+dr, h]`, `linear_kv_up_proj [nh(dqk+dv), kl]`, `linear_proj [h, nh dv]`, norms
`q_layernorm [ql]`, `kv_layernorm [kl]`. With the head count (a flag or the YAML, as for dense attention)
they tell every size, except for MindFormers' fused `linear_qkv` without q compression, where
`qk_pos_emb_head_dim` must be stated. The RoPE variant (`rope_type`) cannot be seen in the tensors and
changes the outputs, so it must be stated; YaRN's factors default to megatron-core's MLATransformerConfig
values (DeepSeek-V3's) and are reported as defaulted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from ms2mg_converter.config import ModelOverrides
from ms2mg_converter.errors import MissingKeyError, ShapeError, UsageError
from ms2mg_converter.layout import MlaFusedKv
from ms2mg_converter.names import (
    K_NORM,
    MLA_KV_DOWN,
    MLA_KV_NORM,
    MLA_KV_UP,
    MLA_Q,
    MLA_Q_DOWN,
    MLA_Q_UP,
    PROJ,
    Q_NORM,
    QKV,
)
from ms2mg_converter.source.resolve import SourceView

if TYPE_CHECKING:
    from ms2mg_converter.model.arch import Architecture

YARN_DEFAULTS: dict[str, float] = {"rotary_scaling_factor": 40.0, "original_max_position_embeddings": 4096,
                                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
"""megatron-core 0.16.1 MLATransformerConfig defaults (DeepSeek-V3's values)."""


class MlaDims(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int
    rope_type: Literal["rope", "yarn"]
    rotary_scaling_factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float

    @property
    def q_rows(self) -> int:
        """Rows of the query projection fed by the hidden state (q_down, or q_proj)."""
        return self.q_lora_rank or self.heads * (self.qk_head_dim + self.qk_pos_emb_head_dim)

    @property
    def kv_down_rows(self) -> int:
        return self.kv_lora_rank + self.qk_pos_emb_head_dim


def is_mla(view: SourceView) -> bool:
    return view.get(MLA_KV_UP + ".weight", 0) is not None


def without_dense_qkv(view: SourceView) -> SourceView:
    """The view without the GQA reading of a fused MLA `linear_qkv` and of its `k_layernorm` (kv_layernorm)."""
    drop = {QKV + ".weight", QKV + ".bias", K_NORM + ".weight", K_NORM + ".bias"}
    logical = {k: v for k, v in view.logical.items() if k[0] not in drop}
    return SourceView(view.family, logical, view.dropped, view.ignored)


def _in(view: SourceView, target: str, layer: int = 0) -> tuple[int, ...] | None:
    logical = view.get(target + ".weight", layer)
    return None if logical is None else logical.inputs[0].shape


def _need(view: SourceView, target: str) -> tuple[int, ...]:
    shape = _in(view, target)
    if shape is None or len(shape) != 2:
        raise MissingKeyError(f"MLA layer 0 has no 2-D {target.replace('{layer}', '0')}.weight (or its MindFormers "
                              "spelling); the checkpoint is incomplete.")
    return shape


def _q_rows_and_rope(view: SourceView, given: ModelOverrides, kl: int) -> tuple[int | None, int, int]:
    """(q_lora_rank, all query rows nh(dqk+dr), qk_pos_emb_head_dim)."""
    kv_down = view.get(MLA_KV_DOWN + ".weight", 0)
    assert kv_down is not None
    down_rows = kv_down.inputs[0].shape[0]
    q_up = _in(view, MLA_Q_UP)
    ql = q_up[1] if q_up is not None else None
    if kv_down.recipe.op is not MlaFusedKv:
        q_rows = q_up[0] if q_up is not None else _need(view, MLA_Q)[0]
        return ql, q_rows, down_rows - kl
    if q_up is not None:
        assert ql is not None
        return ql, q_up[0], down_rows - ql - kl
    dr = given.qk_pos_emb_head_dim
    if dr is None:
        raise UsageError(f"the fused MLA linear_qkv ({down_rows} rows) has no q compression, so its split into "
                         "linear_q_proj and linear_kv_down_proj cannot be read from the shapes: pass "
                         "--qk-pos-emb-head-dim (or --config with qk_rope_head_dim / qk_pos_emb_head_dim).")
    return None, down_rows - kl - dr, dr


def _split_heads(rows: int, heads: int, what: str) -> int:
    if rows % heads:
        raise ShapeError(f"{what} has {rows} rows, not a multiple of the {heads} attention heads; check "
                         "--num-attention-heads.")
    return rows // heads


def _rope(given: ModelOverrides, defaulted: list[str]) -> dict[str, float | int | str]:
    if given.rope_type is None:
        raise UsageError("multi-latent attention models use plain RoPE or YaRN-scaled RoPE, which the tensors "
                         "cannot tell and which changes the outputs: pass --rope-type rope|yarn (with YaRN also "
                         "--rotary-scaling-factor, --original-max-position-embeddings, --beta-fast, --beta-slow, "
                         "--mscale, --mscale-all-dim), or --config with the model's rope_scaling.")
    out: dict[str, float | int | str] = {"rope_type": given.rope_type}
    for name, default in YARN_DEFAULTS.items():
        value = getattr(given, name)
        if value is None and given.rope_type == "yarn":
            defaulted.append(name)
        out[name] = default if value is None else value
    return out


def infer_mla(view: SourceView, given: ModelOverrides, heads: int) -> tuple[MlaDims, tuple[str, ...]]:
    """The MLA sizes from the shapes of layer 0 (checked against the flags), and the defaulted RoPE facts."""
    kv_up = _need(view, MLA_KV_UP)
    kl = kv_up[1]
    ql, q_rows, dr = _q_rows_and_rope(view, given, kl)
    per_q = _split_heads(q_rows, heads, "the MLA query projection")
    dqk = per_q - dr
    dv = _split_heads(kv_up[0], heads, "linear_kv_up_proj") - dqk
    if dr < 1 or dqk < 1 or dv < 1:
        raise ShapeError(f"the MLA shapes give qk_head_dim {dqk}, qk_pos_emb_head_dim {dr}, v_head_dim {dv} with "
                         f"{heads} heads: not a valid model; check --num-attention-heads.")
    found = {"q_lora_rank": ql, "kv_lora_rank": kl, "qk_head_dim": dqk, "qk_pos_emb_head_dim": dr,
             "v_head_dim": dv}
    bad = [f"--{k.replace('_', '-')} {getattr(given, k)} but the tensors say {v}" for k, v in found.items()
           if getattr(given, k) is not None and getattr(given, k) != v]
    if bad:
        raise ShapeError("the MLA description contradicts the checkpoint: " + "; ".join(bad) + ".")
    defaulted: list[str] = []
    dims = MlaDims(heads=heads, **found, **_rope(given, defaulted))
    return dims, tuple(defaulted)


def mla_qk_layernorm(view: SourceView, dims: MlaDims) -> bool:
    """Megatron builds both norms (q only with q compression) with qk_layernorm, neither without it."""
    kv = view.get(MLA_KV_NORM + ".weight", 0) is not None
    q = view.get(Q_NORM + ".weight", 0) is not None
    if dims.q_lora_rank is not None and q != kv:
        raise ShapeError(f"the MLA layers have {'q_layernorm' if q else 'kv_layernorm'} without "
                         f"{'kv_layernorm' if q else 'q_layernorm'}; megatron-core's qk_layernorm builds both.")
    if dims.q_lora_rank is None and q:
        raise ShapeError("the MLA layers have a q_layernorm but no q compression (linear_q_proj); megatron-core "
                         "has no q_layernorm there.")
    return kv


def mla_shapes(dims: MlaDims, hidden: int) -> dict[str, tuple[int, ...]]:
    """Every MLA tensor's Megatron (TP1) shape."""
    nh, dq = dims.heads, dims.qk_head_dim + dims.qk_pos_emb_head_dim
    out: dict[str, tuple[int, ...]] = {
        MLA_KV_DOWN: (dims.kv_down_rows, hidden), MLA_KV_UP: (nh * (dims.qk_head_dim + dims.v_head_dim),
                                                             dims.kv_lora_rank),
        MLA_KV_NORM: (dims.kv_lora_rank,), PROJ: (hidden, nh * dims.v_head_dim)}
    if dims.q_lora_rank is None:
        out[MLA_Q] = (nh * dq, hidden)
    else:
        out.update({MLA_Q_DOWN: (dims.q_lora_rank, hidden), MLA_Q_UP: (nh * dq, dims.q_lora_rank),
                    Q_NORM: (dims.q_lora_rank,)})
    return out


def check_mla_layers(view: SourceView, arch: Architecture) -> None:
    """Every layer's MLA tensors against the sizes read from layer 0 (as built: fused parts by their rows)."""
    assert arch.mla is not None
    if arch.add_bias_linear or arch.add_qkv_bias:
        raise ShapeError("linear biases with multi-latent attention are not supported (megatron-core's MLA has "
                         "none on its projections).")
    for layer in range(arch.num_layers):
        for target, shape in mla_shapes(arch.mla, arch.hidden_size).items():
            logical = view.get(target + ".weight", layer)
            if logical is None:
                if target in (Q_NORM, MLA_KV_NORM) and not arch.qk_layernorm:
                    continue
                raise MissingKeyError(f"decoder layer {layer} has no {target.replace('{layer}', str(layer))}"
                                      ".weight; the checkpoint is incomplete.")
            rows = logical.recipe.op.bind(arch, [i.shape for i in logical.inputs]).runs()
            got = (sum(r.count for r in rows), *logical.inputs[0].shape[1:])
            if got != shape:
                raise ShapeError(f"tensor {logical.inputs[0].name} gives {logical.name} of shape {list(got)}, "
                                 f"expected {list(shape)} (MLA sizes of layer 0: {arch.mla.model_dump()}).")


def mla_parallel_problems(dims: MlaDims, tp: int, down_split: bool) -> list[str]:
    """Sizes a TP split of the MLA projections needs (the down projections only where they are split)."""
    sizes = [("kv_lora_rank + qk_pos_emb_head_dim", dims.kv_down_rows)] if down_split else []
    if down_split and dims.q_lora_rank is not None:
        sizes.append(("q_lora_rank", dims.q_lora_rank))
    return [f"{what} ({n}) is not divisible by tensor parallel size ({tp}): the local spec splits "
            "linear_q_down_proj / linear_kv_down_proj by rows (use --saver-transformer-impl transformer_engine, "
            "which replicates them, or another TP)" for what, n in sizes if n % tp]


def mla_args(dims: MlaDims | None) -> dict[str, object]:
    """Megatron-LM's MLA arguments (`--multi-latent-attention`, ...). `load_args_from_checkpoint` restores
    none of them: the training job must pass them too (README, MLA section)."""
    if dims is None:
        return {"multi_latent_attention": False}
    return {"multi_latent_attention": True, **dims.model_dump(exclude={"heads"})}
