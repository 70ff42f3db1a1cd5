"""Feasibility checks that need only numbers, not tensors (no torch, no numpy).

The converter runs them on the inferred architecture; the operator runs them on the values a
`CheckpointConversion` gives, so an impossible split is refused before a Job starts.
"""

from __future__ import annotations

from ms2mg_converter.config import ModelOverrides, PipelineLayout
from ms2mg_converter.pipeline import layout_problems


def padded_vocab_size(true_vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's `_vocab_size_with_padding`: round up to a multiple of `divisible_by * tp`."""
    multiple = divisible_by * tp
    return -(-true_vocab // multiple) * multiple


def parallelism_problems(model: ModelOverrides, tp: int, pp: int,
                         layout: PipelineLayout | None = None) -> list[str]:
    """Every reason the given architecture values cannot be split TP x PP (empty when fine or unknown).

    Values that are None are skipped: the converter checks them again once the tensors are known. `layout`
    places the layers on the stages (uneven stages, virtual chunks; `pipeline.layout_problems`); its rules
    between flags are checked even when the number of layers is not known yet.
    """
    problems: list[str] = []
    if tp < 1 or pp < 1:
        return [f"tensor ({tp}) and pipeline ({pp}) parallel sizes must be at least 1"]

    def need(value: int | None, what: str, by: int, by_what: str) -> None:
        if value is not None and value % by:
            problems.append(f"{what} ({value}) is not divisible by {by_what} ({by})")

    heads, groups = model.num_attention_heads, model.num_query_groups
    need(heads, "num_attention_heads", tp, "tensor parallel size")
    need(groups, "num_query_groups", tp, "tensor parallel size")
    need(model.ffn_hidden_size, "ffn_hidden_size", tp, "tensor parallel size")
    if heads is not None and groups is not None and heads % groups:
        problems.append(f"num_attention_heads ({heads}) is not divisible by num_query_groups ({groups})")
    problems += layout_problems(model.num_layers, pp, layout or PipelineLayout())
    return problems
