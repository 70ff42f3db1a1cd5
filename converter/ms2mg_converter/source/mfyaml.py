"""Architecture values, model facts and layout flags from a MindFormers model YAML (`--config`).

MindFormers keeps the model description under `model.model_config`; its config classes spell the same
value differently (LlamaConfig `num_heads`/`n_kv_heads`/`theta`/`max_position_embedding`, ChatGLM2Config
`multi_query_group_num`/`layernorm_epsilon`/`rope_ratio`/`padded_vocab_size`, mcore configs HF-style
`num_key_value_heads`/`rope_theta`/`rms_norm_eps`), so each value has a list of accepted spellings, the
first present one wins. The training topology (`parallel_config.model_parallel`) tells the source
tensor-parallel size, which contiguous fused layouts depend on. Unknown keys are ignored: a training YAML
holds much more than the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ms2mg_converter.config import Fc1Layout, LayoutConfig, ModelOverrides, Normalization, QkvLayout
from ms2mg_converter.errors import UsageError

ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_layers", "num_hidden_layers", "n_layer"),
    "hidden_size": ("hidden_size", "dim"),
    "ffn_hidden_size": ("ffn_hidden_size", "intermediate_size"),
    "num_attention_heads": ("num_attention_heads", "num_heads", "n_head"),
    "num_query_groups": ("num_query_groups", "n_kv_heads", "num_key_value_heads", "multi_query_group_num"),
    "kv_channels": ("kv_channels", "head_dim"),
    "seq_length": ("seq_length",),
    "max_position_embeddings": ("max_position_embeddings", "max_position_embedding"),
    "rotary_base": ("rotary_base", "rope_theta", "theta", "rotary_emb_base"),
    "rotary_percent": ("rotary_percent", "rotary_pct", "partial_rotary_factor"),
    "rotary_interleaved": ("rotary_interleaved",),
    "norm_epsilon": ("layernorm_epsilon", "rms_norm_eps", "norm_eps", "layer_norm_epsilon"),
    "add_bias_linear": ("add_bias_linear",),
    "qkv_bias": ("add_qkv_bias", "qkv_has_bias"),
    "qk_layernorm": ("qk_layernorm", "use_qk_norm", "qk_norm"),
    "padded_vocab_size": ("vocab_size", "padded_vocab_size"),
    "q_lora_rank": ("q_lora_rank",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_head_dim": ("qk_head_dim", "qk_nope_head_dim"),
    "qk_pos_emb_head_dim": ("qk_pos_emb_head_dim", "qk_rope_head_dim"),
    "v_head_dim": ("v_head_dim",),
    "rotary_scaling_factor": ("rotary_scaling_factor", "scaling_factor"),
    "original_max_position_embeddings": ("original_max_position_embeddings",),
    "beta_fast": ("beta_fast",),
    "beta_slow": ("beta_slow",),
    "mscale": ("mscale",),
    "mscale_all_dim": ("mscale_all_dim",),
}
"""Model value -> its spellings in MindFormers YAMLs (first present wins)."""

GLM_ROPE_BASE = 10000.0
"""ChatGLM2/GLM-4 (mindformers/models/glm2, glm2_modules.py): RoPE base = 10000 * rope_ratio."""


def _model_section(doc: dict[str, Any]) -> dict[str, Any]:
    model = doc.get("model")
    if isinstance(model, dict) and isinstance(model.get("model_config"), dict):
        return model["model_config"]  # type: ignore[no-any-return]
    if isinstance(doc.get("model_config"), dict):
        return doc["model_config"]  # type: ignore[no-any-return]
    return doc


def _first(section: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if section.get(name) is not None:
            return section[name]
    return None


def _source_tp(doc: dict[str, Any]) -> int | None:
    parallel = doc.get("parallel_config")
    value = parallel.get("model_parallel") if isinstance(parallel, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _layouts(section: dict[str, Any], doc: dict[str, Any]) -> LayoutConfig:
    qkv: QkvLayout | None = None
    for flag in ("use_contiguous_weight_layout_attention", "use_contiguous_weight_layout"):
        if isinstance(section.get(flag), bool):
            qkv = QkvLayout.CONTIGUOUS if section[flag] else QkvLayout.GROUPED
            break
    fc1: Fc1Layout | None = None
    if isinstance(section.get("use_interleaved_weight_layout_mlp"), bool):
        fc1 = Fc1Layout.INTERLEAVED if section["use_interleaved_weight_layout_mlp"] else Fc1Layout.GATE_UP
    return LayoutConfig(qkv=qkv, fc1=fc1, source_tensor_parallel=_source_tp(doc))


def _extras(section: dict[str, Any], values: dict[str, Any]) -> None:
    tie = section.get("tie_word_embeddings", section.get("share_embeddings_and_output_weights"))
    if isinstance(tie, bool):
        values["untie_embeddings_and_output_weights"] = not tie
    if section.get("normalization") in {n.value for n in Normalization}:
        values["normalization"] = section["normalization"]
    elif isinstance(section.get("rmsnorm"), bool):  # ChatGLM2Config
        values["normalization"] = Normalization.RMSNORM if section["rmsnorm"] else Normalization.LAYERNORM
    if section.get("position_embedding_type") in ("rope", "learned_absolute"):
        values["position_embedding_type"] = section["position_embedding_type"]
    ratio = section.get("rope_ratio")
    if "rotary_base" not in values and isinstance(ratio, int | float) and not isinstance(ratio, bool):
        values["rotary_base"] = GLM_ROPE_BASE * ratio


_ROPE_SCALING = {"factor": "rotary_scaling_factor", "original_max_position_embeddings":
                 "original_max_position_embeddings", "beta_fast": "beta_fast", "beta_slow": "beta_slow",
                 "mscale": "mscale", "mscale_all_dim": "mscale_all_dim"}
"""HF-style `rope_scaling: {type: yarn, factor: ...}` keys -> ModelOverrides fields."""


def _mla_rope(section: dict[str, Any], values: dict[str, Any]) -> None:
    """MLA RoPE: MindFormers mcore YAMLs say `position_embedding_type: yarn` (with `multi_latent_attention:
    True`, `rotary_scaling_factor`), HF-style ones `rope_scaling: {type: yarn, factor, ...}`."""
    kind = section.get("position_embedding_type")
    if kind == "yarn" or (kind == "rope" and section.get("multi_latent_attention") is True):
        values["rope_type"] = kind
    scaling = section.get("rope_scaling")
    if isinstance(scaling, dict):
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind in ("yarn", "rope"):
            values.setdefault("rope_type", kind)
        for key, field in _ROPE_SCALING.items():
            if scaling.get(key) is not None:
                values.setdefault(field, scaling[key])


def read_yaml(path: Path) -> tuple[ModelOverrides, LayoutConfig]:
    """The model values, facts and layouts a MindFormers YAML states (missing ones stay None)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: cannot read the MindFormers YAML ({e}).") from e
    if not isinstance(doc, dict):
        raise UsageError(f"--config {path}: expected a YAML mapping with model.model_config.")
    section = _model_section(doc)
    values: dict[str, Any] = {}
    for field, names in ALIASES.items():
        value = _first(section, names)
        if value is not None:
            values[field] = value
    _extras(section, values)
    _mla_rope(section, values)
    try:
        return ModelOverrides(**values), _layouts(section, doc)
    except ValueError as e:
        raise UsageError(f"--config {path}: model_config values are invalid: {e}") from e
