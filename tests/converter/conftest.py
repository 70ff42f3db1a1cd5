"""Shared fixtures for converter tests: tiny sample checkpoints made in tmp_path, and running the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ms2mg_converter.cli.main import main as cli_main
from ms2mg_converter.demo.sample import SampleSpec, build_sample

REPO = Path(__file__).resolve().parents[2]


def sample_flags(spec: SampleSpec) -> list[str]:
    """The flags a user gives for this sample: heads, groups, and layouts where they matter."""
    flags = ["--num-attention-heads", str(spec.num_attention_heads),
             "--num-query-groups", str(spec.num_query_groups)]
    if spec.kv_channels:
        flags += ["--kv-channels", str(spec.kv_channels)]
    if spec.names == "mcore" or spec.legacy_fused:
        flags += ["--qkv-layout", spec.qkv_layout, "--fc1-layout", spec.fc1_layout,
                  "--source-tensor-parallel-size", "1"]
    return flags


@pytest.fixture
def make_sample(tmp_path: Path) -> Callable[..., tuple[Path, SampleSpec, dict[str, Any]]]:
    counter = [0]

    def make(**kw: Any) -> tuple[Path, SampleSpec, dict[str, Any]]:
        counter[0] += 1
        spec = SampleSpec(**kw)
        src = tmp_path / f"src{counter[0]}"
        weights = build_sample(spec, src)
        return src, spec, weights

    return make


@pytest.fixture
def convert() -> Callable[..., int]:
    """Run `ms2mg convert` in-process; returns the exit code."""

    def run(src: Path, dst: Path, *flags: str) -> int:
        return cli_main(["convert", "--load-dir", str(src), "--save-dir", str(dst), "--progress", "none", *flags])

    return run


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m ms2mg_converter ...` in a fresh process (exit codes, stdout, stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "ms2mg_converter", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, check=False)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
