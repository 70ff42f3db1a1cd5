"""Producing one output tensor's bytes, chunk by chunk, from memory-mapped source rows.

Source rows are mapped through a moving window (`SourceWindow`, at most `WINDOW_BYTES` per input), so
only the rows a rank needs are paged in and resident memory never holds more than one window per input.
Rows are cast into reusable chunk buffers (numpy + ml_dtypes: the same round-to-nearest-even as torch,
bit for bit), so the memory used is a few chunks and windows, whatever the size of the model or tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ms2mg_converter.config import DType
from ms2mg_converter.confine import check_open_file
from ms2mg_converter.errors import NonFiniteError, SourceError
from ms2mg_converter.layout import Run
from ms2mg_converter.plan import Read, TensorEntry
from ms2mg_converter.stream.gather import PieceWindow

SOURCE_DTYPES: dict[str, Any] = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                                 "BF16": ml_dtypes.bfloat16}
OUT_DTYPES: dict[DType, Any] = {DType.BF16: ml_dtypes.bfloat16, DType.FP16: np.float16, DType.FP32: np.float32}
_BITS = {DType.BF16: (np.int16, np.uint16, 0x7F80, 0xFF80), DType.FP16: (np.int16, np.uint16, 0x7C00, 0xFC00),
         DType.FP32: (np.int32, np.uint32, 0x7F800000, 0xFF800000)}
Array = np.ndarray[Any, Any]
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
"""Pre-fault the whole mapping in one call: much cheaper than a page fault per 64 KiB of a cached file."""


class SourceWindow:
    """A read-only mapping of a window of a source tensor's rows, moved along as rows are needed.

    Only the rows a rank needs are mapped (and pre-faulted with MAP_POPULATE), at most `max_bytes` at a
    time, so resident memory stays at one window whatever the tensor's size, and a cold cache reads only
    those rows from disk. Views returned by `rows()` must be dropped before the next call.
    """

    def __init__(self, read: Read, max_bytes: int, root: Path | None = None) -> None:
        self.read = read
        self.dtype = np.dtype(SOURCE_DTYPES[read.dtype])
        self.row_bytes = read.cols * self.dtype.itemsize
        self.max_rows = max(1, max_bytes // max(self.row_bytes, 1))
        self._file = open(read.file, "rb")  # noqa: SIM115 - closed in close()
        try:
            check_open_file(self._file.fileno(), read.file, root)
        except BaseException:
            self._file.close()
            raise
        self._map: mmap.mmap | None = None
        self._lo = self._hi = 0
        self._arr: Array | None = None

    def rows(self, a: int, b: int, limit: int) -> Array:
        """Rows [a, b) as an array [b - a, cols]; the window may extend up to row `limit` (exclusive)."""
        if self._arr is None or not (self._lo <= a and b <= self._hi):
            self._remap(a, min(max(b, a + self.max_rows), limit, self.read.rows))
        assert self._arr is not None
        return self._arr[a - self._lo: b - self._lo]

    def _remap(self, lo: int, hi: int) -> None:
        self._unmap()
        begin = self.read.offset + lo * self.row_bytes
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        length = begin - start + (hi - lo) * self.row_bytes
        size = os.fstat(self._file.fileno()).st_size
        if start + length > size:  # reading past the end of a mapping is SIGBUS, not an exception
            raise SourceError(f"{self.read.file}: the file is now {size} bytes, too short for tensor "
                              f"{self.read.name!r}; it changed (was truncated) while converting.")
        if length == 0:
            self._arr, self._lo, self._hi = np.empty((0, self.read.cols), self.dtype), lo, hi
            return
        self._map = mmap.mmap(self._file.fileno(), length, flags=MAP_FLAGS, prot=mmap.PROT_READ, offset=start)
        self._arr = np.frombuffer(self._map, dtype=self.dtype, count=(hi - lo) * self.read.cols,
                                  offset=begin - start).reshape(hi - lo, self.read.cols)
        self._lo, self._hi = lo, hi

    def _unmap(self) -> None:
        self._arr = None
        if self._map is not None:
            with suppress(BufferError):  # a view is still alive: the mapping goes when it does
                self._map.close()
            self._map = None

    def close(self) -> None:
        self._unmap()
        self._file.close()


_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
TRANSPOSE_ROWS = 128
"""Rows per step of the blocked transpose: a strided copy of a whole transposed block runs at ~1/25 of a
contiguous copy (cache misses on every element); 128-row bands at ~1/4 (measured, 2048 x 1536 bf16)."""


def transposed(block: Array) -> Array:
    """A contiguous copy of `block.T`, moved as integer words (exact bits) in row bands."""
    words = block.view(_WORDS[block.dtype.itemsize])
    out = np.empty((block.shape[1], block.shape[0]), words.dtype)
    for i in range(0, block.shape[0], TRANSPOSE_ROWS):
        out[:, i:i + TRANSPOSE_ROWS] = words[i:i + TRANSPOSE_ROWS].T
    return out.view(block.dtype)


class TransposedWindow:
    """Rows of the transpose of a stored block (a grouped expert weight, `source.experts`): the block is
    mapped whole (one expert's h x 2F values) and transposed once into memory of the same size."""

    def __init__(self, read: Read, max_bytes: int, root: Path | None = None) -> None:
        self._inner = SourceWindow(read, max(max_bytes, read.rows * read.cols * 8), root)
        self._rows = read.rows
        self._t: Array | None = None

    def rows(self, a: int, b: int, limit: int) -> Array:
        if self._t is None:
            self._t = transposed(self._inner.rows(0, self._rows, self._rows))
        return self._t[a:b]

    def close(self) -> None:
        self._t = None
        self._inner.close()


Window = SourceWindow | TransposedWindow | PieceWindow


def open_window(read: Read, max_bytes: int, root: Path | None = None) -> Window:
    """The reader of one input: plain rows, a transposed expert block, or slices of a distributed source."""
    if read.pieces:
        return PieceWindow(read, np.dtype(SOURCE_DTYPES[read.dtype]), max_bytes, root)
    return TransposedWindow(read, max_bytes, root) if read.transposed else SourceWindow(read, max_bytes, root)


class WriterStopped(RuntimeError):
    """The writer thread stopped (its error is re-raised by the caller)."""


class BufferPool:
    """A fixed set of chunk buffers passed between the producer and the writer thread."""

    def __init__(self, dtype: DType, chunk_bytes: int, count: int, abort: threading.Event) -> None:
        self.dtype = dtype
        self.elems = max(1, chunk_bytes // np.dtype(OUT_DTYPES[dtype]).itemsize)
        self._free: queue.Queue[Array] = queue.Queue()
        self._abort = abort
        for _ in range(count):
            self._free.put(np.empty(self.elems, OUT_DTYPES[dtype]))

    def get(self, min_elems: int) -> Array:
        if min_elems > self.elems:
            return np.empty(min_elems, OUT_DTYPES[self.dtype])  # a row wider than a chunk: one-off buffer
        while True:
            if self._abort.is_set():
                raise WriterStopped("the writer thread stopped")
            try:
                return self._free.get(timeout=0.2)
            except queue.Empty:
                continue

    def put(self, buf: Array) -> None:
        if buf.size == self.elems:
            self._free.put(buf)


class FiniteCheck:
    """Finds NaN/Inf in cast chunks from their bit patterns, with two max reductions and no writes.

    Viewed as a signed integer, +Inf/+NaN are the values at or above the +Inf pattern; viewed as unsigned,
    -Inf/-NaN are the values at or above the -Inf pattern (every other negative float is below it).
    """

    def __init__(self, dtype: DType) -> None:
        self._signed, self._unsigned, self._pos_inf, self._neg_inf = _BITS[dtype]

    def bad(self, chunk: Array) -> bool:
        if not chunk.size:
            return False
        return (int(chunk.view(self._signed).max()) >= self._pos_inf
                or int(chunk.view(self._unsigned).max()) >= self._neg_inf)


WINDOW_BYTES = 64 * 1024 * 1024


def _source_rows(win: Window, run: Run, done: int, k: int, cols: tuple[int, int]) -> Array:
    c0, c1 = cols
    if run.step == 0:
        return np.broadcast_to(win.rows(run.start, run.start + 1, run.start + 1)[0, c0:c1], (k, c1 - c0))
    first = run.start + done * run.step
    last = first + (k - 1) * run.step + 1
    limit = run.start + (run.count - 1) * run.step + 1
    return win.rows(first, last, limit)[:: run.step, c0:c1]


def produce(entry: TensorEntry, pool: BufferPool, check: FiniteCheck | None,
            root: Path | None = None) -> Iterator[tuple[Array, int]]:
    """Yield (buffer, elements used) chunks that together are the entry's bytes, in row-major order.

    With `root`, every source file must resolve inside it (checked on the open descriptor)."""
    width = math.prod(entry.shape[1:])
    cols = entry.cols or (0, width)
    rows_per = max(1, pool.elems // max(width, 1))
    with ExitStack() as stack:
        windows: list[Window] = []
        for r in entry.inputs:
            windows.append(open_window(r, WINDOW_BYTES, root))
            stack.callback(windows[-1].close)
        buf, filled = pool.get(width), 0
        for run in entry.runs:
            done = 0
            while done < run.count:
                k = min(run.count - done, rows_per - filled)
                dst = buf[filled * width: (filled + k) * width].reshape(k, width)
                if run.src is None:
                    dst[...] = 0
                else:
                    np.copyto(dst, _source_rows(windows[run.src], run, done, k, cols), casting="unsafe")
                filled, done = filled + k, done + k
                if filled == rows_per:
                    yield _checked(entry, buf, filled * width, check)
                    buf, filled = pool.get(width), 0
        if filled:
            yield _checked(entry, buf, filled * width, check)
        else:
            pool.put(buf)


def _checked(entry: TensorEntry, buf: Array, n: int, check: FiniteCheck | None) -> tuple[Array, int]:
    if check is not None and check.bad(buf[:n]):
        raise NonFiniteError(f"tensor {entry.source} (output {entry.key}) holds NaN or Inf values after the "
                             f"cast to {entry.dtype} (source: {', '.join(r.name for r in entry.inputs)}). "
                             "Such a checkpoint is usually diverged or corrupt; pass --allow-nonfinite to "
                             "convert it anyway.")
    return buf, n
