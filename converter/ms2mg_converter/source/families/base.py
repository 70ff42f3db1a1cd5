"""What a naming family is: a table of Megatron tensors, each built by a named operation from source names.

A table is a list of `Recipe`s. Each recipe names one Megatron tensor (a canonical name from `names`, a
template with `{layer}`), the operation class that builds it (`layout.ops`), and the source tensor(s) it
is built from. Where a target can be built several ways (fused or separate q/k/v, SwiGLU or not), the table
lists each way; per layer the recipe whose sources are all present, and that uses the most of them, wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ms2mg_converter.layout import Copy, LayoutOp


@dataclass(frozen=True)
class Recipe:
    target: str
    op: type[LayoutOp]
    sources: tuple[str, ...]
    requires: tuple[str, ...] = ()
    """Source templates that must be present for this recipe to apply, without being read (a zero bias
    synthesized only where the family has biases)."""


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    recipes: tuple[Recipe, ...]
    fused_qkv_default: str | None = None
    """The only QKV layout this family's code writes (None: it varies by version, the user must say)."""
    fused_fc1_default: str | None = None
    """The only fc1 layout this family's code writes (None: the user must say)."""
    facts: dict[str, float | bool] = field(default_factory=dict)
    """Model facts this family's architecture fixes (e.g. GLM-4's rotary_percent 0.5), cited in its module."""
    layout_help: dict[str, str] = field(default_factory=dict)
    """'qkv' / 'fc1' -> how this family's versions lay the fused tensor out (for the refusal message)."""


def same(*targets: str, op: type[LayoutOp] = Copy) -> tuple[Recipe, ...]:
    """Recipes for tensors whose source name is the Megatron name."""
    return tuple(Recipe(t, op, (t,)) for t in targets)


def template_regex(template: str) -> re.Pattern[str]:
    """`{layer}` (and `{expert}`, a routed expert's number) as numbers."""
    pattern = re.escape(template).replace(re.escape("{layer}"), r"(?P<layer>0|[1-9][0-9]*)")
    return re.compile(pattern.replace(re.escape("{expert}"), r"(?P<expert>0|[1-9][0-9]*)") + "$")


@dataclass(frozen=True)
class SourceMatch:
    template: str
    layer: int | None


class SourceMatcher:
    """Finds which source template (and layer) a key belongs to, for one family."""

    def __init__(self, family: Family) -> None:
        templates = sorted({s for r in family.recipes for s in (*r.sources, *r.requires)})
        self._exact = {t for t in templates if "{layer}" not in t}
        self._patterns = [(t, template_regex(t)) for t in templates if "{layer}" in t]

    def match(self, key: str) -> SourceMatch | None:
        if key in self._exact:
            return SourceMatch(key, None)
        for template, pattern in self._patterns:
            m = pattern.match(key)
            if m:
                expert = m.groupdict().get("expert")  # per-expert names: the template with the number filled in
                filled = template if expert is None else template.replace("{expert}", expert)
                return SourceMatch(filled, int(m.group("layer")))
        return None
