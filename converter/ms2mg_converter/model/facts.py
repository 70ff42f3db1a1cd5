"""Model facts the tensors cannot tell: rotary base, percent and interleaving, norm epsilon, positions.

Megatron rebuilds the model from the checkpoint's `args` (`--use-checkpoint-args`), so a wrong rotary base
or epsilon loads without error and computes wrong outputs. Each fact is taken, first present wins, from:
the command-line flags, the MindFormers YAML (`--config`), the naming family (facts its architecture fixes,
e.g. GLM-4's half-dimension interleaved RoPE), and only then Megatron's default — and every fact that fell
through to a default is listed in `defaulted`, which the result, the manifest and the operator's status
report, so nobody mistakes a guess for a known value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from ms2mg_converter.config import ModelOverrides

DEFAULTS: dict[str, float | bool | int] = {
    "rotary_base": 10000.0,
    "rotary_percent": 1.0,
    "rotary_interleaved": False,
    "norm_epsilon": 1e-5,
    "seq_length": 2048,
}
"""Megatron-LM's own defaults (arguments.py / TransformerConfig), used when nothing states a fact."""

ROPE_FACTS = ("rotary_base", "rotary_percent", "rotary_interleaved")


class ModelFacts(BaseModel):
    """The resolved facts, and which of them nothing stated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rotary_base: float
    rotary_percent: float
    rotary_interleaved: bool
    norm_epsilon: float
    seq_length: int
    max_position_embeddings: int
    defaulted: tuple[str, ...]


def _pick(name: str, given: ModelOverrides, family: Mapping[str, float | bool],
          defaulted: list[str]) -> float | bool | int:
    value = getattr(given, name)
    if value is not None:
        return value  # type: ignore[no-any-return]
    if name in family:
        return family[name]
    defaulted.append(name)
    return DEFAULTS[name]


def resolve_facts(given: ModelOverrides, family: Mapping[str, float | bool], rope: bool,
                  position_rows: int | None) -> ModelFacts:
    """Flags over YAML (`given`), then the family's facts, then defaults. Facts the model does not use are
    not reported (RoPE facts of a learned-position model; positions come from its table)."""
    defaulted: list[str] = []
    values = {name: _pick(name, given, family, defaulted) for name in DEFAULTS}
    if position_rows is not None:
        positions = position_rows
    elif given.max_position_embeddings is not None:
        positions = given.max_position_embeddings
    else:
        positions = int(values["seq_length"])
        defaulted.append("max_position_embeddings")
    if not rope:
        defaulted = [d for d in defaulted if d not in ROPE_FACTS]
    return ModelFacts(rotary_base=float(values["rotary_base"]), rotary_percent=float(values["rotary_percent"]),
                      rotary_interleaved=bool(values["rotary_interleaved"]),
                      norm_epsilon=float(values["norm_epsilon"]), seq_length=int(values["seq_length"]),
                      max_position_embeddings=positions, defaulted=tuple(sorted(defaulted)))


class _HasFacts(Protocol):
    @property
    def defaulted(self) -> tuple[str, ...]: ...


def _value(facts: _HasFacts, name: str) -> object:
    """A fact's value; MoE router facts live in the architecture's `moe` part (`model.moe`), MLA's RoPE facts
    in `mla` (`model.mla.MlaDims`)."""
    if hasattr(facts, name):
        return getattr(facts, name)
    for part in ("moe", "mla"):
        value = getattr(getattr(facts, part, None), name, None)
        if value is not None:
            return value
    return None


def describe_defaulted(facts: _HasFacts) -> str:
    """One line for the log and the result: which facts were defaulted, to what, and how to state them."""
    shown = ", ".join(f"{name}={_value(facts, name)}" for name in facts.defaulted)
    return (f"model facts not stated by the flags, the --config YAML or the naming family were set to "
            f"Megatron's defaults: {shown}. If the model was trained with other values, the converted "
            "checkpoint computes wrong outputs: state them with --config MODEL.yaml or the flags "
            + ", ".join(f"--{n.replace('_', '-')}" for n in facts.defaulted) + ".")
