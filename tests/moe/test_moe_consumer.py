"""Converted MoE checkpoints in real megatron-core 0.16.1 (CPU): strict load of every rank file at TP/EP combos
(SequentialMLP experts; TEGroupedMLP needs TransformerEngine, which has no CPU build), and logits against the
plain-torch reference of the truth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.families.runner import convert
from tests.moe.consumer import logits, strict_load_all
from tests.moe.fixture import MoeDims, make_truth, write_mindformers
from tests.moe.reference import reference_logits

pytest.importorskip("megatron.core")


def _converted(tmp_path: Path, d: MoeDims, tp: int, ep: int, *extra: str) -> Path:
    src, cfg = write_mindformers(tmp_path, d, make_truth(d))
    out = tmp_path / "out"
    run = convert("--load-dir", str(src), "--config", str(cfg), "--save-dir", str(out), "--tp", str(tp),
                  "--target-expert-parallel-size", str(ep), *extra)
    assert run.returncode == 0, run.stderr
    return out


@pytest.mark.parametrize(("tp", "ep"), [(1, 2), (2, 2), (2, 1), (1, 4)])
def test_every_rank_loads_strictly(tmp_path: Path, tp: int, ep: int) -> None:
    models = strict_load_all(_converted(tmp_path, MoeDims(), tp, ep))
    assert sorted(models) == [(t, e) for t in range(tp) for e in range(ep)]


def test_logits_match_reference(tmp_path: Path) -> None:
    d = MoeDims()
    out = _converted(tmp_path, d, 1, 1, "--dtype", "fp32")
    (model,) = strict_load_all(out, torch.float32).values()
    ids = torch.tensor([[3, 17, 42, 99, 200, 7, 150, 64]])
    got = logits(model, ids)[0]
    want = reference_logits(make_truth(d), d, ids[0])
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
