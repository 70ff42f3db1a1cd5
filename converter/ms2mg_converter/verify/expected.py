"""Expected tensor shards for `ms2mg verify`, computed from the source with torch and `safetensors`.

Fused tensors (linear_qkv, SwiGLU linear_fc1) are rebuilt whole with their layout operation's torch
statement (`LayoutOp.apply`, written apart from the row maps the converter executes) and split with
Megatron's TP rules (`Split.shards`); everything else is a plain copy, a column split or the vocabulary table, compared
in row blocks so memory stays small even for a large embedding. Values are cast with torch into a reused
scratch buffer and compared bit for bit (NaN matches NaN, whatever its payload).
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ms2mg_converter.config import PadFill
from ms2mg_converter.confine import check_source_path
from ms2mg_converter.errors import SourceError
from ms2mg_converter.layout import LayoutOp, Split, VocabResize, covered, glu_parts
from ms2mg_converter.plan import Plan, TensorEntry, layout_op
from ms2mg_converter.plan.target import split_of
from ms2mg_converter.source.resolve import Logical, resolve
from ms2mg_converter.verify.ckptfile import MAP_FLAGS
from ms2mg_converter.verify.gathered import GatheredSlice, gathered

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SOURCE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
BLOCK_BYTES = 16 * 1024 * 1024


def describe_mismatch(got: torch.Tensor, exp: torch.Tensor) -> str | None:
    """None when equal bit for bit (NaN matching NaN); else a short description."""
    exp = exp.to(got.dtype)
    if got.shape != exp.shape:
        return f"shape {list(got.shape)} != expected {list(exp.shape)}"
    same = (got == exp) | (torch.isnan(got) & torch.isnan(exp))
    if bool(same.all()):
        return None
    bad = int((~same).sum())
    first = tuple(int(i) for i in (~same).nonzero()[0])
    return (f"{bad} of {got.numel()} values differ (first at index {first}: {got[first].item()} vs "
            f"{exp[first].item()})")


class _Scratch:
    """Reused buffers for casting and rearranging expected values, so comparing allocates (and page-faults)
    once per slot instead of once per tensor."""

    def __init__(self) -> None:
        self._buf: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self._buf.get((dtype, slot))
        if buf is None or buf.numel() < numel:
            buf = self._buf[(dtype, slot)] = torch.empty(max(numel, 1 << 20), dtype=dtype)
        return buf[:numel].view(shape)

    def cast(self, exp: torch.Tensor, dtype: torch.dtype, slot: int = 0, copy: bool = False) -> torch.Tensor:
        """`exp` in `dtype`, contiguous; a copy in the slot's buffer unless it already is (or `copy`)."""
        if exp.dtype == dtype and exp.is_contiguous() and not copy:
            return exp
        out = self.empty(exp.shape, dtype, slot)
        out.copy_(exp)  # torch's cast, into contiguous memory
        return out


class _TensorFile:
    """Zero-copy views of whole source tensors: the safetensors header parsed here again (json + struct),
    the tensor's bytes mapped read-only. Used for the fused tensors, which are rebuilt whole."""

    def __init__(self, path: Path) -> None:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.path, self.data_start = path, 8 + n

    @contextmanager
    def tensor(self, name: str) -> Iterator[torch.Tensor]:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        start = self.data_start + begin
        base = start - start % mmap.ALLOCATIONGRANULARITY
        if end == begin:
            yield torch.empty(entry["shape"], dtype=SOURCE_DTYPES[entry["dtype"]])
            return
        with self.path.open("rb") as f, mmap.mmap(f.fileno(), start - base + end - begin, prot=mmap.PROT_READ,
                                                 flags=MAP_FLAGS, offset=base) as m:
            view = memoryview(m)[start - base:]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: never written to
                t = torch.frombuffer(view, dtype=SOURCE_DTYPES[entry["dtype"]]).view(entry["shape"])
            try:
                yield t
            finally:
                del t
                view.release()


class ExpectedTensors:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.arch = plan.arch
        self.cfg = plan.config
        self.tp = plan.shard_tp
        for f in plan.source.files:  # safe_open below follows links: the files must stay inside --load-root
            check_source_path(f.path, plan.config.load_root)
        view = resolve(plan.source, plan.config.ignore_keys)
        self.by_name: dict[str, Logical] = {lg.name: lg for lg in view.logical.values()}
        self._cache: tuple[str, torch.Tensor] | None = None
        self._scratch = _Scratch()

    def _same(self, got: torch.Tensor, exp: torch.Tensor) -> str | None:
        if got.shape != exp.shape:
            return f"shape {list(got.shape)} != expected {list(exp.shape)}"
        cast = self._scratch.cast(exp, got.dtype)
        if torch.equal(_words(got), _words(cast)):
            return None
        return describe_mismatch(got, cast)

    def mismatch(self, entry: TensorEntry, tp_rank: int, got: torch.Tensor) -> str | None:
        logical = self.by_name[entry.source]
        kind = split_of(logical.target, self.cfg.transformer_impl)
        op = layout_op(logical, self.arch, self.cfg)
        if logical.inputs and logical.inputs[0].block is not None:
            return self._expert(logical, kind, tp_rank, got)
        if not op.rebuild_whole and not (kind is Split.GLU and self.arch.swiglu):  # GLU: two row ranges
            return self._blockwise(logical, op, kind, tp_rank, got)
        full = self._fused(logical, op, TORCH_DTYPES[entry.dtype])
        tp = self.tp
        if kind is Split.GLU and self.arch.swiglu:
            gate, up = glu_parts(full, tp, tp_rank)
            return self._same(got[: gate.shape[0]], gate) or self._same(got[gate.shape[0]:], up)
        return self._same(got, kind.shards(full, tp, self.arch.swiglu)[tp_rank])

    # -- fused tensors: whole ----------------------------------------------------------------------
    def _fused(self, logical: Logical, op: LayoutOp, dtype: torch.dtype) -> torch.Tensor:
        """The whole Megatron tensor, in the output dtype, built by `op.apply` in reused buffers.

        Casting first and rearranging after gives the same bits (the cast is element-wise) and moves half
        the bytes; the result stays valid until the next fused tensor is built."""
        if self._cache is not None and self._cache[0] == logical.name:
            return self._cache[1]
        try:
            with ExitStack() as stack:
                views = [gathered(i) if i.pieces else stack.enter_context(_TensorFile(i.file).tensor(i.name))
                         for i in logical.inputs]
                inputs = [self._scratch.cast(v, dtype, slot=1 + n, copy=True) for n, v in enumerate(views)]
                views.clear()
        except (OSError, KeyError, ValueError) as e:
            raise SourceError(f"{logical.inputs[0].file}: cannot read {logical.name}'s source to verify it ({e}); "
                              "did the source change while converting?") from e
        shape = (covered(op.runs()), *(inputs[0].shape[1:] if inputs else ()))
        out = self._scratch.empty(shape, dtype, slot=0)
        self._cache = (logical.name, op.apply(inputs, out=out))
        return self._cache[1]

    # -- routed experts: block e of MindFormers' grouped weight, transposed -----------------------------
    def _expert(self, logical: Logical, kind: Split, r: int, got: torch.Tensor) -> str | None:
        """Expert x's Megatron tensor restated from the grouped source: weight1 is [E, h, 2F] in memory
        (weight2 [E, F, h]), expert x's linear_fc1 is `W1[x].T`, linear_fc2 `W2[x].T` (§1.2)."""
        info = logical.inputs[0]
        assert info.block is not None
        x, experts = info.block
        try:
            with _TensorFile(info.file).tensor(info.name) as stored:
                block = stored.reshape(experts, info.shape[1], info.shape[0])[x]
                full = block.t().to(got.dtype, copy=True)  # a copy: the mapping closes below
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise SourceError(f"{info.file}: cannot read {info.name} to verify {logical.name} ({e}); did the "
                              "source change while converting?") from e
        tp = self.cfg.tensor_parallel
        if kind is Split.GLU:
            gate, up = glu_parts(full, tp, r)
            return self._same(got[: gate.shape[0]], gate) or self._same(got[gate.shape[0]:], up)
        return self._same(got, kind.shards(full, tp, True)[r])

    # -- everything else: row blocks ----------------------------------------------------------------
    def _blockwise(self, logical: Logical, op: LayoutOp, kind: Split, r: int, got: torch.Tensor) -> str | None:
        info = logical.inputs[0]
        cols = info.shape[1] if len(info.shape) > 1 else 1
        rows = op.padded_rows if isinstance(op, VocabResize) else info.shape[0]
        ((lo, hi),) = kind.row_ranges(rows, self.tp, r, self.arch.swiglu)
        c = kind.col_range(cols, self.tp, r)
        col = slice(None) if c is None else slice(*c)
        if got.shape[0] != hi - lo:
            return f"{got.shape[0]} rows, expected {hi - lo}"
        step = max(1, BLOCK_BYTES // max(1, cols * 4))
        try:
            with ExitStack() as stack, safe_open(str(info.file), framework="pt") as f:
                sl = GatheredSlice(info, stack) if info.pieces else f.get_slice(info.name)
                for a in range(lo, hi, step):
                    b = min(hi, a + step)
                    for (x, y), exp in _expected_rows(sl, op, a, b):
                        if len(info.shape) > 1:
                            exp = exp[:, col]
                        bad = self._same(got[x - lo: y - lo], exp)
                        if bad:
                            return f"rows {x}..{y}: {bad}"
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{info.file}: cannot read tensor {info.name!r} to verify it ({e}); did the source "
                              "change while converting?") from e
        return None


def _expected_rows(sl: Any, op: LayoutOp, a: int, b: int) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """Rows [a, b) of the target table, as (row range, tensor) parts (a fill part is one row, expanded)."""
    if not isinstance(op, VocabResize):
        return [((a, b), _rows(sl, a, b))]
    kept = op.kept
    if op.fill is PadFill.ZERO:
        fill = torch.zeros_like(_rows(sl, 0, 1))
    else:
        fill = _rows(sl, op.source_rows - 1, op.source_rows)
    parts = []
    if a < kept:
        parts.append(((a, min(b, kept)), _rows(sl, a, min(b, kept))))
    if b > kept:
        parts.append(((max(a, kept), b), fill.expand(b - max(a, kept), *fill.shape[1:])))
    return parts


def _words(t: torch.Tensor) -> torch.Tensor:
    """The bits of a contiguous tensor as 64-bit words where possible (torch.equal is ~3x faster on them than
    on 16-bit integers), else as integers of the element's size."""
    flat = t.reshape(-1)
    if (flat.numel() * flat.element_size()) % 8 == 0 and (flat.storage_offset() * flat.element_size()) % 8 == 0:
        return flat.view(torch.int64)
    return flat.view(_BITS[t.dtype])


def _rows(sl: Any, a: int, b: int) -> torch.Tensor:
    return sl[a:b]  # type: ignore[no-any-return]
