"""Source tensors of a distributed checkpoint for `ms2mg verify`, gathered from their rank-file slices with
`safetensors` + torch (apart from the converter's own reader, `stream/gather.py`)."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from safetensors import safe_open

from ms2mg_converter.source.index import TensorInfo


class GatheredSlice:
    """`safe_open(...).get_slice(name)` for a tensor cut over rank files: `[a:b]` gives whole rows."""

    def __init__(self, info: TensorInfo, stack: ExitStack) -> None:
        self.info = info
        self._slices = [stack.enter_context(safe_open(str(p.file), framework="pt")).get_slice(info.name)
                        for p in info.pieces]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        a, b, _ = rows.indices(self.info.shape[0]) if self.info.shape else (0, 0, 1)
        first = self._slices[0][0:0] if self.info.shape else self._slices[0][()]
        out = torch.empty((b - a, *self.info.shape[1:]), dtype=first.dtype)
        for p, sl in zip(self.info.pieces, self._slices, strict=True):
            r0, r1 = max(a, p.start[0]), min(b, p.start[0] + p.shape[0])
            if r0 >= r1:
                continue
            part = sl[r0 - p.start[0]: r1 - p.start[0]]
            box = tuple(slice(s, s + n) for s, n in zip(p.start[1:], p.shape[1:], strict=True))
            out[(slice(r0 - a, r1 - a), *box)] = part
        return out


def gathered(info: TensorInfo) -> torch.Tensor:
    """The whole tensor, assembled in memory from its slices."""
    with ExitStack() as stack:
        return GatheredSlice(info, stack)[0: info.shape[0]]
