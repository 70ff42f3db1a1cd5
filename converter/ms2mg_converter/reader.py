"""Producing one output tensor's bytes, chunk by chunk, from memory-mapped source rows.

Each source tensor an entry needs is mapped on its own (and unmapped right after), so only the rows a
rank needs are paged in and the process never holds more than one tensor's mapping. Rows are cast into
reusable chunk buffers (numpy + ml_dtypes: the same round-to-nearest-even as torch, bit for bit), so the
memory used is a few chunks, whatever the size of the model or of the tensor.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import ml_dtypes
import numpy as np

from ms2mg_converter.config import DType
from ms2mg_converter.errors import NonFiniteError
from ms2mg_converter.plan import Read, TensorEntry

SOURCE_DTYPES: dict[str, Any] = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                                 "BF16": ml_dtypes.bfloat16}
OUT_DTYPES: dict[DType, Any] = {DType.BF16: ml_dtypes.bfloat16, DType.FP16: np.float16, DType.FP32: np.float32}
_BITS = {DType.BF16: (np.int16, np.uint16, 0x7F80, 0xFF80), DType.FP16: (np.int16, np.uint16, 0x7C00, 0xFC00),
         DType.FP32: (np.int32, np.uint32, 0x7F800000, 0xFF800000)}
Array = np.ndarray[Any, Any]
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
"""Pre-fault the whole mapping in one call: much cheaper than a page fault per 64 KiB of a cached file."""


@contextmanager
def mapped(read: Read) -> Iterator[Array]:
    """The source tensor as a read-only [rows, cols] array backed by the file's page cache.

    The caller must drop every view of the array before leaving the block, so the mapping can be closed.
    """
    start = read.offset - read.offset % mmap.ALLOCATIONGRANULARITY
    itemsize = np.dtype(SOURCE_DTYPES[read.dtype]).itemsize
    length = read.offset - start + read.rows * read.cols * itemsize
    if read.rows * read.cols == 0:
        yield np.empty((read.rows, read.cols), SOURCE_DTYPES[read.dtype])
        return
    with open(read.file, "rb") as f:
        m = mmap.mmap(f.fileno(), length, flags=MAP_FLAGS, prot=mmap.PROT_READ, offset=start)
    try:
        yield np.frombuffer(m, dtype=SOURCE_DTYPES[read.dtype], count=read.rows * read.cols,
                            offset=read.offset - start).reshape(read.rows, read.cols)
    finally:
        with suppress(BufferError):  # a view is still alive: the mapping goes when it does
            m.close()


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


def _rows(src: Array, start: int, step: int, k: int, cols: tuple[int, int]) -> Array:
    c0, c1 = cols
    if step == 0:
        return np.broadcast_to(src[start, c0:c1], (k, c1 - c0))
    return src[start: start + (k - 1) * step + 1: step, c0:c1]


def produce(entry: TensorEntry, pool: BufferPool, check: FiniteCheck | None) -> Iterator[tuple[Array, int]]:
    """Yield (buffer, elements used) chunks that together are the entry's bytes, in row-major order."""
    width = entry.cols[1] - entry.cols[0] if entry.cols else entry.inputs[0].cols
    cols = entry.cols or (0, entry.inputs[0].cols)
    rows_per = max(1, pool.elems // max(width, 1))
    with ExitStack() as stack:
        sources = [stack.enter_context(mapped(r)) for r in entry.inputs]
        stack.callback(sources.clear)
        buf, filled = pool.get(width), 0
        for run in entry.runs:
            done = 0
            while done < run.count:
                k = min(run.count - done, rows_per - filled)
                dst = buf[filled * width: (filled + k) * width].reshape(k, width)
                if run.src is None:
                    dst[...] = 0
                else:
                    start = run.start + done * run.step
                    np.copyto(dst, _rows(sources[run.src], start, run.step, k, cols), casting="unsafe")
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
