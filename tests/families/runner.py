"""Running the real CLI in a fresh process and reading what it wrote."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tests.families.expected import OUT_DTYPE, Rank


def convert(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ms2mg_converter convert ARGS` (exit code, stdout and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "ms2mg_converter", "convert", "--progress", "none", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def load_rank_files(save_dir: Path) -> dict[str, dict[str, Any]]:
    """Rank directory name -> the whole `model_optim_rng.pt` dict, loaded with weights_only=True."""
    out: dict[str, dict[str, Any]] = {}
    with torch.serialization.safe_globals([argparse.Namespace]):
        for d in sorted((save_dir / "iter_0000001").iterdir()):
            out[d.name] = torch.load(d / "model_optim_rng.pt", weights_only=True)
    return out


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def mismatches(expected: Rank, got: dict[str, Any]) -> list[str]:
    """Every difference between one expected rank and a written `model` dict (empty: identical)."""
    problems = [f"missing {k}" for k in expected.keys() - got.keys()]
    problems += [f"unexpected {k}" for k in got.keys() - expected.keys()]
    for key in sorted(expected.keys() & got.keys()):
        want, have = expected[key], got[key]
        if want is None or have is None:
            if want is not have:
                problems.append(f"{key}: expected {want!r:.40}, got {have!r:.40}")
        elif have.dtype != OUT_DTYPE or have.shape != want.shape:
            problems.append(f"{key}: expected {OUT_DTYPE} {tuple(want.shape)}, got {have.dtype} {tuple(have.shape)}")
        elif not torch.equal(have, want):
            problems.append(f"{key}: values differ")
    return problems


def arg_mismatches(want: Mapping[str, object], args: argparse.Namespace) -> list[str]:
    return [f"args.{k}: expected {v!r}, got {getattr(args, k, '<absent>')!r}"
            for k, v in want.items() if getattr(args, k, object()) != v]
