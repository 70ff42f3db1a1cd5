"""Matching source keys against the mapping tables: which recipe builds each Megatron tensor.

The result, `SourceView`, lists for every canonical Megatron tensor (template + layer) the recipe and
the source tensors it reads, plus the keys that were dropped (optimizer state, bookkeeping) or ignored
(`--ignore-keys`). A key that nothing explains is an error, so nothing is silently left out.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass

from ms2mg_converter.errors import SourceError, UnknownKeyError
from ms2mg_converter.names import fill
from ms2mg_converter.source.experts import expand_experts, per_expert_recipes
from ms2mg_converter.source.families import Family, Recipe, detect, is_dropped
from ms2mg_converter.source.index import FLOAT_DTYPES, SourceIndex, TensorInfo


@dataclass(frozen=True)
class Logical:
    """One canonical (TP1/PP1) Megatron tensor and the source tensors it is built from."""

    target: str
    layer: int | None
    recipe: Recipe
    inputs: tuple[TensorInfo, ...]

    @property
    def name(self) -> str:
        return fill(self.target, self.layer)


@dataclass(frozen=True)
class SourceView:
    family: Family
    logical: dict[tuple[str, int | None], Logical]
    dropped: tuple[str, ...]
    ignored: tuple[str, ...]

    def get(self, target: str, layer: int | None = None) -> Logical | None:
        return self.logical.get((target, layer))

    @property
    def layers(self) -> list[int]:
        return sorted({layer for (_, layer) in self.logical if layer is not None})


def _unknown(keys: list[str], family: Family) -> UnknownKeyError:
    shown = ", ".join(repr(k) for k in keys[:10])
    more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
    return UnknownKeyError(f"{len(keys)} source key(s) are not part of the {family.name} mapping table: "
                           f"{shown}{more}. If they are not model weights, drop them with --ignore-keys "
                           "GLOB; if they are, this architecture is not supported yet.")


def _classify(index: SourceIndex, ignore: tuple[str, ...]) -> tuple[
        Family, dict[tuple[str, int | None], TensorInfo], list[str], list[str]]:
    keys = sorted(index.tensors)
    dropped = [k for k in keys if is_dropped(k)]
    ignored = [k for k in keys if k not in dropped and any(fnmatch.fnmatchcase(k, g) for g in ignore)]
    rest = [k for k in keys if k not in set(dropped) | set(ignored)]
    family, matcher = detect(rest or keys)
    present: dict[tuple[str, int | None], TensorInfo] = {}
    unknown = []
    for key in rest:
        m = matcher.match(key)
        if m is None:
            unknown.append(key)
        else:
            present[(m.template, m.layer)] = index.tensors[key]
    if unknown:
        raise _unknown(unknown, family)
    return family, present, dropped, ignored


def _choose(recipes: list[Recipe], layer: int | None,
            present: dict[tuple[str, int | None], TensorInfo]) -> Recipe | None:
    usable = [r for r in recipes if all((s, layer) in present for s in (*r.sources, *r.requires))]
    return max(usable, key=lambda r: len(r.sources), default=None)


def resolve(index: SourceIndex, ignore: tuple[str, ...] = ()) -> SourceView:
    """Match every source key to a recipe of one family (raises on unknown or unused keys)."""
    family, present, dropped, ignored = _classify(index, ignore)
    by_target: dict[str, list[Recipe]] = defaultdict(list)
    for recipe in per_expert_recipes(family.recipes, {t for (t, _) in present}):
        by_target[recipe.target].append(recipe)
    layers: set[int | None] = {layer for (_, layer) in present}
    logical: dict[tuple[str, int | None], Logical] = {}
    used: set[tuple[str, int | None]] = set()
    for target, recipes in by_target.items():
        for layer in sorted(layers if "{layer}" in target else {None}, key=lambda x: -1 if x is None else x):
            if layer is None and "{layer}" in target:
                continue
            chosen = _choose(recipes, layer, present)
            if chosen is None:
                continue
            recipe = chosen
            inputs = tuple(present[(s, layer)] for s in recipe.sources)
            for info in inputs:
                if info.dtype not in FLOAT_DTYPES:
                    raise SourceError(f"{info.file}: weight {info.name!r} has dtype {info.dtype}; ms2mg converts "
                                      f"weights stored as {', '.join(FLOAT_DTYPES)}.")
            logical[(target, layer)] = Logical(target, layer, recipe, inputs)
            used.update((s, layer) for s in recipe.sources)
    expand_experts(logical, Logical)
    unused = sorted(present[k].name for k in present.keys() - used)
    if unused:
        raise SourceError(f"source key(s) {', '.join(unused[:5])} cannot be used: their partner tensors are "
                          "missing (e.g. feed_forward.w3 without w1, or wk without wq). The checkpoint is "
                          "incomplete.")
    return SourceView(family, logical, tuple(dropped), tuple(ignored))
