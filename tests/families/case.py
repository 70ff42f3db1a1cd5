"""A built fixture: where the MindFormers checkpoint and YAML are, its truth, and what the user must pass."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.families.truth import Truth

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    family: str
    load_dir: Path
    config: Path | None
    truth: Truth
    flags: tuple[str, ...] = ()
    """Flags a user must add because the YAML cannot tell (layouts of that MindFormers version)."""
    stated_args: Mapping[str, object] = field(default_factory=dict)
    """Megatron `args` values the family's YAML (or its fixed architecture) states."""
    dropped: frozenset[str] = frozenset()
    """Optimizer and bookkeeping keys in the source: dropped and listed, never converted."""

    def cli(self, with_flags: bool = True) -> list[str]:
        """`--load-dir`, `--true-vocab-size`, `--config` and (unless `with_flags` is False) the layout flags."""
        out = ["--load-dir", str(self.load_dir), "--true-vocab-size", str(self.truth.dims.vocab)]
        if self.config is not None:
            out += ["--config", str(self.config)]
        return [*out, *self.flags] if with_flags else out
