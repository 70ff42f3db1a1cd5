"""Rows of a tensor of a distributed source, gathered from its slices in the rank files (`Read.pieces`).

`PieceWindow` has `SourceWindow`'s interface: `rows(a, b, limit)` returns rows [a, b) of the whole tensor
viewed as [rows, cols]. It fills one reused buffer of at most `max_bytes` (or the rows asked for) with the
part of every slice that falls in the window: a slice's rows are contiguous in its file, so each is one
read; a slice that holds all columns (a row split) is read straight into the buffer, a column slice into a
scratch buffer and copied into its columns. Memory is one window plus one slice window, whatever the
tensor's size; nothing is merged on disk.
"""

from __future__ import annotations

import math
from contextlib import suppress
from io import BufferedReader
from pathlib import Path
from typing import Any

import numpy as np

from ms2mg_converter.confine import check_open_file
from ms2mg_converter.errors import SourceError
from ms2mg_converter.plan import Read
from ms2mg_converter.source.index import Piece

Array = np.ndarray[Any, Any]


class PieceWindow:
    """A window of a cut tensor's rows, assembled from its slices (see the module doc)."""

    def __init__(self, read: Read, dtype: np.dtype[Any], max_bytes: int, root: Path | None = None) -> None:
        self.read, self.dtype, self.root = read, dtype, root
        first = read.pieces[0]
        self.tail = tuple(max(p.start[k] + p.shape[k] for p in read.pieces) for k in range(1, len(first.shape)))
        self.row_bytes = read.cols * dtype.itemsize
        self.max_rows = max(1, max_bytes // max(self.row_bytes, 1))
        self._files: dict[Path, BufferedReader] = {}
        self._buf: Array = np.empty(0, dtype)
        self._scratch: Array = np.empty(0, np.uint8)
        self._arr: Array | None = None
        self._lo = self._hi = 0

    def rows(self, a: int, b: int, limit: int) -> Array:
        """Rows [a, b) as an array [b - a, cols]; the window may extend up to row `limit` (exclusive)."""
        if self._arr is None or not (self._lo <= a and b <= self._hi):
            self._fill(a, min(max(b, a + self.max_rows), limit, self.read.rows))
        assert self._arr is not None
        return self._arr[a - self._lo: b - self._lo]

    def _file(self, path: Path) -> BufferedReader:
        f = self._files.get(path)
        if f is None:
            f = open(path, "rb")  # noqa: SIM115 - closed in close()
            self._files[path] = f
            check_open_file(f.fileno(), path, self.root)
        return f

    def _fill(self, lo: int, hi: int) -> None:
        n = hi - lo
        if self._buf.size < n * self.read.cols:
            self._arr = None
            self._buf = np.empty(n * self.read.cols, self.dtype)
        whole = self._buf[: n * self.read.cols].reshape(n, *self.tail)
        for p in self.read.pieces:
            r0, r1 = max(lo, p.start[0]), min(hi, p.start[0] + p.shape[0])
            if r0 < r1:
                self._copy(p, r0, r1, whole[r0 - lo: r1 - lo])
        self._arr, self._lo, self._hi = whole.reshape(n, self.read.cols), lo, hi

    def _copy(self, p: Piece, r0: int, r1: int, dst: Array) -> None:
        width = math.prod(p.shape[1:])
        count = (r1 - r0) * width
        begin = p.offset + (r0 - p.start[0]) * width * self.dtype.itemsize
        if p.shape[1:] == self.tail:  # all columns: the buffer rows are the slice's rows
            self._read_into(p, begin, dst.reshape(-1))
            return
        if self._scratch.size < count * self.dtype.itemsize:
            self._scratch = np.empty(count * self.dtype.itemsize, np.uint8)
        part = self._scratch[: count * self.dtype.itemsize].view(self.dtype)
        self._read_into(p, begin, part)
        cols = tuple(slice(s, s + n) for s, n in zip(p.start[1:], p.shape[1:], strict=True))
        dst[(slice(None), *cols)] = part.reshape(r1 - r0, *p.shape[1:])

    def _read_into(self, p: Piece, begin: int, out: Array) -> None:
        f = self._file(p.file)
        f.seek(begin)
        view = out.view(np.uint8).data
        got = f.readinto(view)
        if got != view.nbytes:
            raise SourceError(f"{p.file}: read {got} of {view.nbytes} bytes of tensor {self.read.name!r} at byte "
                              f"{begin}; the file is now shorter than its header says (changed while converting?).")

    def close(self) -> None:
        self._arr = None
        for f in self._files.values():
            with suppress(OSError):
                f.close()
        self._files.clear()
