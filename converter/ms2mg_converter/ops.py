"""Named layout operations, expressed as row maps (pure Python: no torch, no numpy).

Every fused-layout fix this converter needs moves whole rows: regrouping QKV per query group, fusing
q/k/v, de-interleaving or fusing SwiGLU gate/up, and padding or trimming the vocabulary. So each operation
is described by the runs of rows it copies: target rows `[dst, dst + count)` come from input `src` rows
`start, start + step, ...` (step 0 repeats one row, `src=None` fills zeros). A tensor is viewed as
`[rows, cols]`, cols being the product of the other dimensions (1 for a vector).

Because the map is data, the planner can intersect it with each tensor-parallel rank's rows and read only
those rows of the source ("split before fusing"), and `ms2mg inspect` can print it. The inverse of each
operation is implemented independently, with torch, in `reference_ops.py`, and `ms2mg verify` uses that.
"""

from __future__ import annotations

from dataclasses import dataclass

from ms2mg_converter.config import Fc1Layout, PadFill, QkvLayout


@dataclass(frozen=True)
class Run:
    """Target rows [dst, dst+count) <- rows start + i*step of input `src` (None: zeros)."""

    dst: int
    count: int
    src: int | None
    start: int
    step: int = 1

    def source_rows(self) -> range:
        if self.src is None:
            return range(0)
        return range(self.start, self.start + max(self.count - 1, 0) * self.step + 1)


def identity(rows: int) -> list[Run]:
    return [Run(0, rows, 0, 0)]


def _grouped(heads: int, groups: int, head_dim: int, starts: tuple[int, int, int],
             srcs: tuple[int, int, int]) -> list[Run]:
    q_per = heads // groups
    runs: list[Run] = []
    for g in range(groups):
        base = g * (q_per + 2) * head_dim
        runs.append(Run(base, q_per * head_dim, srcs[0], starts[0] + g * q_per * head_dim))
        runs.append(Run(base + q_per * head_dim, head_dim, srcs[1], starts[1] + g * head_dim))
        runs.append(Run(base + (q_per + 1) * head_dim, head_dim, srcs[2], starts[2] + g * head_dim))
    return runs


def qkv_fused(heads: int, groups: int, head_dim: int, layout: QkvLayout) -> list[Run]:
    """One fused tensor in `layout` -> Megatron grouped: per group [its Q heads; K head; V head]."""
    rows = (heads + 2 * groups) * head_dim
    if layout is QkvLayout.GROUPED:
        return identity(rows)
    return _grouped(heads, groups, head_dim, (0, heads * head_dim, (heads + groups) * head_dim), (0, 0, 0))


def qkv_split(heads: int, groups: int, head_dim: int) -> list[Run]:
    """Inputs q [heads*d], k [groups*d], v [groups*d] -> Megatron grouped layout."""
    return _grouped(heads, groups, head_dim, (0, 0, 0), (0, 1, 2))


def glu_fused(ffn: int, layout: Fc1Layout) -> list[Run]:
    """One fused SwiGLU fc1 [2f] in `layout` -> [gate; up]."""
    if layout is Fc1Layout.GATE_UP:
        return identity(2 * ffn)
    return [Run(0, ffn, 0, 0, 2), Run(ffn, ffn, 0, 1, 2)]


def glu_split(ffn: int) -> list[Run]:
    """Inputs gate [f], up [f] -> [gate; up]."""
    return [Run(0, ffn, 0, 0), Run(ffn, ffn, 1, 0)]


def vocab(source_rows: int, true_rows: int, padded_rows: int, fill: PadFill) -> list[Run]:
    """Resize an embedding-like table to `padded_rows`.

    `last-row` is Megatron's saver, bit for bit: rows [0, min(source, padded)) are copied, and when the
    table must grow, the new rows repeat the source's last row. `zero`: rows [0, true) are copied and every
    row past the true vocabulary is zero.
    """
    if fill is PadFill.ZERO:
        runs = [Run(0, true_rows, 0, 0)]
        if padded_rows > true_rows:
            runs.append(Run(true_rows, padded_rows - true_rows, None, 0))
        return runs
    kept = min(source_rows, padded_rows)
    runs = [Run(0, kept, 0, 0)]
    if padded_rows > kept:
        runs.append(Run(kept, padded_rows - kept, 0, source_rows - 1, 0))
    return runs


def select(runs: list[Run], lo: int, hi: int) -> list[Run]:
    """The part of `runs` covering target rows [lo, hi), renumbered to start at 0."""
    out: list[Run] = []
    for r in runs:
        a, b = max(lo, r.dst), min(hi, r.dst + r.count)
        if a >= b:
            continue
        start = r.start + (a - r.dst) * r.step if r.src is not None else 0
        out.append(Run(a - lo, b - a, r.src, start, r.step))
    return out


def covered(runs: list[Run]) -> int:
    """Number of target rows the runs define; raises if they leave gaps or overlap."""
    pos = 0
    for r in sorted(runs, key=lambda r: r.dst):
        if r.dst != pos:
            raise ValueError(f"row map gap or overlap at row {pos} (next run starts at {r.dst})")
        pos += r.count
    return pos
