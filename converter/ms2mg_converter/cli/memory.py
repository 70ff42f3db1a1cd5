"""The peak-memory estimate `ms2mg inspect` prints, for converting and for converting with verification.

Resident memory (VmHWM) counts the pages of memory-mapped files a process has touched, and both the
converter and the verifier read through mappings, so the estimate adds up what is mapped or allocated at
the worst moment (measured on bench-1b and a 0.4 GB model, see docs/performance.md):

* converting: the interpreter with numpy and ml_dtypes; the chunk pool (`POOL_BUFFERS` + 1 chunks); the two
  O_DIRECT buffers; and, for the tensor that needs most, one read window per input (at most
  `WINDOW_BYTES`, covering the source rows the rank reads);
* verifying: torch and safetensors; the reused scratch buffers that rebuild fused tensors (the largest
  fused tensor in the output dtype, once per input and once rebuilt); and, for the tensor that needs most,
  its record in the rank file (mapped whole) plus the source bytes read for it (the whole source tensor
  for a fused one; the rank's rows, full width, for a table compared in blocks).
"""

from __future__ import annotations

import math

from ms2mg_converter.plan import DTYPE_BYTES, Plan, TensorEntry
from ms2mg_converter.source.index import DTYPE_SIZES
from ms2mg_converter.stream.reader import WINDOW_BYTES
from ms2mg_converter.write.base import CHUNK_BYTES, POOL_BUFFERS
from ms2mg_converter.write.directio import BUFFER_BYTES

MiB = 1024 * 1024
CONVERT_BASE = 55 * MiB
"""Python with ms2mg, pydantic, numpy, ml_dtypes and zlib-ng imported (measured VmHWM: 53 MiB)."""
VERIFY_BASE = 240 * MiB
"""The same with torch and safetensors imported (measured: 238 MiB)."""


def _source_span(entry: TensorEntry, src: int) -> int:
    """Source rows [first, last] of input `src` that the entry's runs read."""
    rows = [r for run in entry.runs if run.src == src for r in (run.source_rows().start, run.source_rows().stop)
            if run.count]
    return max(rows) - min(rows) if rows else 0


def _windows(entry: TensorEntry) -> int:
    # a grouped expert block is mapped whole and transposed once (stream.reader.TransposedWindow): twice its size
    return sum(2 * read.rows * read.cols * DTYPE_SIZES[read.dtype] if read.transposed else
               min(WINDOW_BYTES, _source_span(entry, i) * read.cols * DTYPE_SIZES[read.dtype])
               for i, read in enumerate(entry.inputs))


def convert_peak(plan: Plan) -> int:
    """Peak resident bytes of `ms2mg convert --no-verify`."""
    entries = [e for f in plan.files for e in f.entries() if isinstance(e, TensorEntry)]
    windows = max((_windows(e) for e in entries), default=0)
    return CONVERT_BASE + (POOL_BUFFERS + 1) * CHUNK_BYTES + 2 * BUFFER_BYTES + windows


def _source_bytes(entry: TensorEntry) -> int:
    return sum(r.rows * r.cols * DTYPE_SIZES[r.dtype] for r in entry.inputs)


def verify_peak(plan: Plan) -> int:
    """Peak resident bytes of the verification (in `ms2mg convert` or `ms2mg verify`)."""
    scratch, working = 0, 0
    for f in plan.files:
        for e in f.entries():
            if not isinstance(e, TensorEntry):
                continue
            out = DTYPE_BYTES[e.dtype]
            if e.rebuild_whole:
                numel = sum(r.rows * r.cols for r in e.inputs) or math.prod(e.shape)
                scratch = max(scratch, numel * out * (1 + len(e.inputs)))
                working = max(working, e.nbytes + _source_bytes(e))
            else:
                read = e.inputs[0]
                rows = min(e.shape[0], read.rows)
                working = max(working, e.nbytes + rows * read.cols * DTYPE_SIZES[read.dtype])
    return VERIFY_BASE + scratch + working


def peak_memory_estimate(plan: Plan) -> int:
    """Peak resident bytes of the conversion as configured (with verification unless --no-verify)."""
    convert = convert_peak(plan)
    return max(convert, verify_peak(plan)) if plan.config.verify else convert
