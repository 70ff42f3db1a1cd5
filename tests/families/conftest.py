"""Fixture sources are built once per session (cheap, deterministic) and shared read-only by the tests."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.families import fam_glm4, fam_llama3, fam_mcore_layernorm, fam_qwen3, fam_qwen25, fam_telechat2
from tests.families.case import Case
from tests.families.runner import convert

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


@dataclass(frozen=True)
class Conversion:
    """One finished `ms2mg convert` run of a family case: its process, output directory and result file."""

    case: Case
    process: subprocess.CompletedProcess[str]
    save_dir: Path
    result_file: Path


@pytest.fixture(scope="session")
def converted(built: Callable[[str], Case], family_root: Path) -> Callable[[str, int, int], Conversion]:
    """Convert a family case at TP/PP once per session (with the layout flags its YAML cannot give)."""
    cache: dict[tuple[str, int, int], Conversion] = {}

    def get(name: str, tp: int, pp: int) -> Conversion:
        if (name, tp, pp) not in cache:
            case, out = built(name), family_root / "out" / f"{name}-tp{tp}pp{pp}"
            result = out.with_suffix(".result.json")
            r = convert(*case.cli(), "--save-dir", str(out), "--tp", str(tp), "--pp", str(pp), "--no-verify",
                        "--result-file", str(result))
            cache[name, tp, pp] = Conversion(case, r, out, result)
        return cache[name, tp, pp]

    return get
