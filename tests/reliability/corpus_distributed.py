"""Bad-input cases for distributed MindFormers sources (`rank_N/` + strategy), appended to `corpus.CASES`.

Each build writes a valid 4-rank (TP2 x DP2) distributed checkpoint under the case's `src/` (cut from the
sample by `tests/converter/_mf_distributed.py`, strategy files in `../strategy/` as MindFormers writes them),
then damages it. The builders take the corpus `Ctx` (duck-typed here to avoid an import cycle).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ms2mg_converter.demo.sample import SampleSpec, logical_weights, mindformers_tensors
from tests.converter._mf_distributed import Layout, distribute

QKV = "decoder.layers.0.self_attention.linear_qkv.weight"
FC2 = "decoder.layers.1.mlp.linear_fc2.weight"


def _world(ctx: Any, lay: Layout | None = None) -> list[str]:
    from tests.reliability.corpus import flags_for

    spec = SampleSpec()
    merged = ctx.root / "merged"
    merged.mkdir(exist_ok=True)
    save_file(mindformers_tensors(spec, logical_weights(spec)), str(merged / "model.safetensors"))
    distribute(merged, ctx.src, lay or Layout(tp=2, dp=2), spec.num_layers, spec.tied)
    for p in [*ctx.src.rglob("*"), *(ctx.root / "strategy").iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return flags_for(spec)


def _rewrite(rank_dir: Path, edit: Any) -> None:
    f = next(rank_dir.glob("*.safetensors"))
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "ms"})


def missing_rank(ctx: Any) -> list[str]:
    flags = _world(ctx)
    shutil.rmtree(ctx.src / "rank_1")
    return flags


def fewer_ranks(ctx: Any) -> list[str]:
    flags = _world(ctx)
    shutil.rmtree(ctx.src / "rank_3")
    return flags


def rank_lacks_tensor(ctx: Any) -> list[str]:
    flags = _world(ctx)
    for r in (1, 3):  # the slice and its data-parallel replica
        _rewrite(ctx.src / f"rank_{r}", lambda t: t.pop(FC2))
    return flags


def slice_shape(ctx: Any) -> list[str]:
    flags = _world(ctx)

    def edit(t: dict[str, Any]) -> None:
        t[QKV] = t[QKV][:-1].clone()

    _rewrite(ctx.src / "rank_2", edit)
    return flags


def no_strategy(ctx: Any) -> list[str]:
    flags = _world(ctx)
    shutil.rmtree(ctx.root / "strategy")
    return flags


def strategy_truncated(ctx: Any) -> list[str]:
    flags = _world(ctx)
    for f in (ctx.root / "strategy").iterdir():
        f.write_bytes(f.read_bytes()[:-5])
    return flags


def strategy_flag_missing(ctx: Any) -> list[str]:
    return [*_world(ctx), "--src-strategy", str(ctx.root / "no-such-strategy")]


def strategy_of_other_run(ctx: Any) -> list[str]:
    flags = _world(ctx)
    other = ctx.root / "other" / "checkpoint"
    spec = SampleSpec()
    distribute(ctx.root / "merged", other, Layout(tp=4, dp=1), spec.num_layers, spec.tied)
    return [*flags, "--src-strategy", str(ctx.root / "other" / "strategy")]


def suffix_matches_nothing(ctx: Any) -> list[str]:
    return [*_world(ctx), "--src-ckpt-suffix", "9_9"]


def distributed_cases(case: Any) -> tuple[Any, ...]:
    """The cases, as `corpus.Case` objects (`case` is that class)."""
    bad = "InvalidSource"
    return (
        case("dist-missing-rank-dir", "distributed source: rank_1/ of rank_0..rank_3 is missing", missing_rank,
             3, bad, ("rank_1", "missing")),
        case("dist-rank-count", "distributed source: 3 rank_N/ directories, the strategy spans 4 devices",
             fewer_ranks, 3, bad, ("3 rank_N directories", "4 ranks")),
        case("dist-rank-lacks-tensor", "distributed source: rank_1 and its replica rank_3 lack a linear_fc2 slice",
             rank_lacks_tensor, 3, bad, (FC2, "rank_1", "rank_3")),
        case("dist-slice-shape", "distributed source: rank_2's linear_qkv slice is one row short", slice_shape,
             3, bad, (QKV, "rank_2")),
        case("dist-no-strategy", "distributed source without a strategy file", no_strategy, 3, bad,
             ("no strategy file", "--src-strategy")),
        case("dist-strategy-truncated", "distributed source: strategy files cut by 5 bytes", strategy_truncated,
             3, bad, ("ckpt_strategy_rank_0.ckpt", "truncated")),
        case("dist-strategy-flag-missing", "--src-strategy names a path that does not exist",
             strategy_flag_missing, 3, bad, ("--src-strategy", "no-such-strategy")),
        case("dist-strategy-of-other-run", "--src-strategy of a TP4 run for TP2 x DP2 rank files",
             strategy_of_other_run, 3, "ShapeMismatch", (QKV, "expected")),
        case("dist-suffix-matches-nothing", "--src-ckpt-suffix 9_9 matches no rank file", suffix_matches_nothing,
             3, bad, ("rank_0", "9_9.safetensors", "--src-ckpt-suffix")),
    )
