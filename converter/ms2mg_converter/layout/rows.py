"""Row maps: the one primitive every layout operation is executed with (pure Python: no torch, no numpy).

Every fused-layout fix this converter needs moves whole rows: regrouping QKV per query group, fusing
q/k/v, de-interleaving or fusing SwiGLU gate/up, and padding or trimming the vocabulary. So each operation
is described by the runs of rows it copies: target rows `[dst, dst + count)` come from input `src` rows
`start, start + step, ...` (step 0 repeats one row, `src=None` fills zeros). A tensor is viewed as
`[rows, cols]`, cols being the product of the other dimensions (1 for a vector).

Because the map is data, the planner can intersect it with each tensor-parallel rank's rows and read only
those rows of the source ("split before fusing"), and `ms2mg inspect` can print it.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def shifted(self, offset: int) -> Run:
        return Run(self.dst + offset, self.count, self.src, self.start, self.step)


def identity(rows: int, src: int = 0) -> list[Run]:
    return [Run(0, rows, src, 0)]


def concat(*parts: list[Run]) -> list[Run]:
    """The row maps one after the other in the target (each part renumbered after the previous ones)."""
    out: list[Run] = []
    pos = 0
    for part in parts:
        out.extend(r.shifted(pos) for r in part)
        pos += covered(part)
    return out


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
