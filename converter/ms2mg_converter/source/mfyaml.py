"""Architecture values and layout flags from a MindFormers model YAML (`--config`).

MindFormers keeps the model description under `model.model_config`; legacy (llama-style) and mcore
configs spell some keys differently, so each value has a list of accepted spellings. Unknown keys are
ignored: a training YAML holds much more than the model.
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
    "max_position_embeddings": ("max_position_embeddings",),
    "rotary_base": ("rotary_base", "rope_theta", "theta"),
    "norm_epsilon": ("layernorm_epsilon", "rms_norm_eps", "norm_eps", "layer_norm_epsilon"),
    "add_bias_linear": ("add_bias_linear",),
    "qkv_bias": ("add_qkv_bias", "qkv_has_bias"),
    "qk_layernorm": ("qk_layernorm", "use_qk_norm", "qk_norm"),
}


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


def _layouts(section: dict[str, Any]) -> LayoutConfig:
    qkv: QkvLayout | None = None
    for flag in ("use_contiguous_weight_layout_attention", "use_contiguous_weight_layout"):
        if isinstance(section.get(flag), bool):
            qkv = QkvLayout.CONTIGUOUS if section[flag] else QkvLayout.GROUPED
            break
    fc1: Fc1Layout | None = None
    if isinstance(section.get("use_interleaved_weight_layout_mlp"), bool):
        fc1 = Fc1Layout.INTERLEAVED if section["use_interleaved_weight_layout_mlp"] else Fc1Layout.GATE_UP
    return LayoutConfig(qkv=qkv, fc1=fc1)


def _extras(section: dict[str, Any], values: dict[str, Any]) -> None:
    tie = section.get("tie_word_embeddings", section.get("share_embeddings_and_output_weights"))
    if isinstance(tie, bool):
        values["untie_embeddings_and_output_weights"] = not tie
    if section.get("normalization") in {n.value for n in Normalization}:
        values["normalization"] = section["normalization"]
    if section.get("position_embedding_type") in ("rope", "learned_absolute"):
        values["position_embedding_type"] = section["position_embedding_type"]
    if isinstance(section.get("vocab_size"), int):
        values["padded_vocab_size"] = section["vocab_size"]


def read_yaml(path: Path) -> tuple[ModelOverrides, LayoutConfig]:
    """The model values and layouts a MindFormers YAML states (missing ones stay None)."""
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
    try:
        return ModelOverrides(**values), _layouts(section)
    except ValueError as e:
        raise UsageError(f"--config {path}: model_config values are invalid: {e}") from e
