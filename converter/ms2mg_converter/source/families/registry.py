"""The registry of naming families: each family module registers its table; detection picks one."""

from __future__ import annotations

from ms2mg_converter.errors import UnknownKeyError
from ms2mg_converter.source.families.base import Family, SourceMatcher

_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (at import of its module); a second family of the same name is a programming error."""
    if family.name in _FAMILIES:
        raise ValueError(f"naming family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES.values())


def detect(keys: list[str]) -> tuple[Family, SourceMatcher]:
    """The family whose table explains the most keys (ties: by name, so the choice is stable)."""
    scored = []
    for family in _FAMILIES.values():
        matcher = SourceMatcher(family)
        scored.append((sum(matcher.match(k) is not None for k in keys), family.name, family, matcher))
    scored.sort(key=lambda s: (-s[0], s[1]))
    if not scored or scored[0][0] == 0:
        names = ", ".join(keys[:5])
        known = ", ".join(sorted(_FAMILIES))
        raise UnknownKeyError(f"no key of the source matches a known MindFormers naming family ({known}); "
                              f"first keys: {names}. Is this a MindFormers LLM checkpoint?")
    return scored[0][2], scored[0][3]
