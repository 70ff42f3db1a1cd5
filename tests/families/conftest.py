"""Fixture sources are built once per session (cheap, deterministic) and shared read-only by the tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.families import fam_glm4, fam_llama3, fam_mcore_layernorm, fam_qwen3, fam_qwen25, fam_telechat2
from tests.families.case import Case

FAMILIES: dict[str, Callable[[Path], Case]] = {
    "qwen3-r1.6": lambda root: fam_qwen3.build(root, "r1.6"),
    "qwen3-r1.7": lambda root: fam_qwen3.build(root, "r1.7"),
    "qwen3-r1.7-yaml-layouts": lambda root: fam_qwen3.build(root, "r1.7-yaml"),
    "llama3-legacy-split": fam_llama3.build,
    "qwen2.5-legacy-r1.3": lambda root: fam_qwen25.build(root, "r1.3"),
    "qwen2.5-legacy-r1.4": lambda root: fam_qwen25.build(root, "r1.4"),
    "glm4": fam_glm4.build,
    "telechat2": fam_telechat2.build,
    "mcore-layernorm-gamma-beta": fam_mcore_layernorm.build,
}


@pytest.fixture(scope="session")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="session")
def built(family_root: Path) -> Callable[[str], Case]:
    """Build (once) and return the named family case."""
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            cache[name] = FAMILIES[name](family_root)
        return cache[name]

    return get
