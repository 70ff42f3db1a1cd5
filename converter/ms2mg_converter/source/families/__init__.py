"""Naming families: one module per MindFormers naming scheme, each a mapping table (data), found by detection.

Adding a family = one module here that builds a `Family` of `Recipe`s and calls `register`, its import
below, and a fixture in tests/families/ (see docs/adding-a-model-family.md).

Public names: `Family`, `Recipe`, `SourceMatcher`, `register`, `families`, `detect`, `is_dropped`.
"""

from ms2mg_converter.source.families import glm4, legacy, mcore, telechat2  # noqa: F401 - registers them
from ms2mg_converter.source.families.base import Family, Recipe, SourceMatch, SourceMatcher, same
from ms2mg_converter.source.families.dropped import DROPPED, is_dropped
from ms2mg_converter.source.families.registry import detect, families, register

__all__ = ["DROPPED", "Family", "Recipe", "SourceMatch", "SourceMatcher", "detect", "families", "is_dropped",
           "register", "same"]
