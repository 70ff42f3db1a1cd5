"""Expected tensor shards for `ms2mg verify`, computed from the source with torch and `safetensors`.

Fused tensors (linear_qkv, SwiGLU linear_fc1) are rebuilt whole with `reference_ops` and split with
Megatron's TP rules; everything else is a plain copy, a column split or the vocabulary table, compared
in row blocks so memory stays small even for a large embedding. Values are cast with torch into a reused
scratch buffer and compared bit for bit (NaN matches NaN, whatever its payload).
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ms2mg_converter import reference_ops as ref
from ms2mg_converter.config import Fc1Layout, PadFill, QkvLayout
from ms2mg_converter.errors import SourceError
from ms2mg_converter.plan import Plan, TensorEntry
from ms2mg_converter.resolve import Logical, resolve
from ms2mg_converter.tables import OpKind
from ms2mg_converter.target import Split, split_of

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
BLOCK_BYTES = 16 * 1024 * 1024
FUSED = (OpKind.QKV_FUSED, OpKind.QKV_SPLIT, OpKind.GLU_FUSED, OpKind.GLU_SPLIT)


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
    """A reused buffer for casting expected values, so comparing allocates (and page-faults) once."""

    def __init__(self) -> None:
        self._buf: dict[torch.dtype, torch.Tensor] = {}

    def cast(self, exp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if exp.dtype == dtype and exp.is_contiguous():
            return exp
        buf = self._buf.get(dtype)
        if buf is None or buf.numel() < exp.numel():
            buf = self._buf[dtype] = torch.empty(max(exp.numel(), 1 << 20), dtype=dtype)
        out = buf[: exp.numel()].view(exp.shape)
        out.copy_(exp)  # torch's cast, into contiguous memory
        return out


class ExpectedTensors:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.arch = plan.arch
        self.cfg = plan.config
        view = resolve(plan.source, plan.config.ignore_keys)
        self.by_name: dict[str, Logical] = {lg.name: lg for lg in view.logical.values()}
        self._cache: tuple[str, torch.Tensor] | None = None
        self._scratch = _Scratch()

    def _same(self, got: torch.Tensor, exp: torch.Tensor) -> str | None:
        if got.shape != exp.shape:
            return f"shape {list(got.shape)} != expected {list(exp.shape)}"
        cast = self._scratch.cast(exp, got.dtype)
        bits = _BITS[got.dtype]
        if torch.equal(got.view(bits), cast.view(bits)):
            return None
        return describe_mismatch(got, cast)

    def mismatch(self, entry: TensorEntry, tp_rank: int, got: torch.Tensor) -> str | None:
        logical = self.by_name[entry.source]
        kind = split_of(logical.target)
        if logical.recipe.op in FUSED and (self.arch.swiglu or logical.recipe.op is not OpKind.GLU_FUSED):
            full = self._fused(logical, TORCH_DTYPES[entry.dtype])
            tp = self.cfg.tensor_parallel
            if kind is Split.GLU and self.arch.swiglu:
                gate, up = ref.glu_shard_parts(full, tp, tp_rank)
                return self._same(got[: gate.shape[0]], gate) or self._same(got[gate.shape[0]:], up)
            return self._same(got, ref.tp_split(full, kind, tp, self.arch.swiglu)[tp_rank])
        return self._blockwise(logical, kind, tp_rank, got)

    # -- fused tensors: whole ----------------------------------------------------------------------
    def _fused(self, logical: Logical, dtype: torch.dtype) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == logical.name:
            return self._cache[1]
        inputs = [_read(i.file, i.name) for i in logical.inputs]
        a, op = self.arch, logical.recipe.op
        if op is OpKind.QKV_FUSED:
            full = ref.qkv_to_grouped(inputs[0], a.num_attention_heads, a.num_query_groups, a.kv_channels,
                                      a.qkv_layout or QkvLayout.GROUPED)
        elif op is OpKind.QKV_SPLIT:
            full = ref.qkv_split_to_grouped(inputs[0], inputs[1], inputs[2], a.num_query_groups)
        elif op is OpKind.GLU_FUSED:
            full = ref.glu_to_gate_up(inputs[0], a.fc1_layout or Fc1Layout.GATE_UP)
        else:
            full = torch.cat(inputs, dim=0)
        self._cache = (logical.name, full.to(dtype))
        return self._cache[1]

    # -- everything else: row blocks ----------------------------------------------------------------
    def _shard_window(self, kind: Split, rows: int, cols: int, r: int) -> tuple[int, int, slice]:
        tp = self.cfg.tensor_parallel
        if kind is Split.VOCAB:
            per = self.arch.padded_vocab_size // tp
            return r * per, (r + 1) * per, slice(None)
        if kind in (Split.COLUMN, Split.GLU):
            return r * rows // tp, (r + 1) * rows // tp, slice(None)
        if kind is Split.ROW:
            return 0, rows, slice(r * cols // tp, (r + 1) * cols // tp)
        return 0, rows, slice(None)

    def _blockwise(self, logical: Logical, kind: Split, r: int, got: torch.Tensor) -> str | None:
        info = logical.inputs[0]
        cols = info.shape[1] if len(info.shape) > 1 else 1
        lo, hi, col = self._shard_window(kind, info.shape[0], cols, r)
        if got.shape[0] != hi - lo:
            return f"{got.shape[0]} rows, expected {hi - lo}"
        step = max(1, BLOCK_BYTES // max(1, cols * 4))
        try:
            with safe_open(str(info.file), framework="pt") as f:
                sl = f.get_slice(info.name)
                for a in range(lo, hi, step):
                    b = min(hi, a + step)
                    for (x, y), exp in self._expected_rows(sl, kind, a, b):
                        if len(info.shape) > 1:
                            exp = exp[:, col]
                        bad = self._same(got[x - lo: y - lo], exp)
                        if bad:
                            return f"rows {x}..{y}: {bad}"
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{info.file}: cannot read tensor {info.name!r} to verify it ({e}); did the source "
                              "change while converting?") from e
        return None

    def _expected_rows(self, sl: Any, kind: Split, a: int, b: int) -> list[tuple[tuple[int, int], torch.Tensor]]:
        """Rows [a, b) of the target table, as (row range, tensor) parts (a fill part is one row)."""
        if kind is not Split.VOCAB:
            return [((a, b), _rows(sl, a, b))]
        rows = self.arch.source_vocab_rows
        if self.cfg.vocab.pad_fill is PadFill.ZERO:
            kept = self.arch.true_vocab_size or rows
            fill = torch.zeros_like(_rows(sl, 0, 1))
        else:
            kept = min(rows, self.arch.padded_vocab_size)
            fill = _rows(sl, rows - 1, rows)
        parts = []
        if a < kept:
            parts.append(((a, min(b, kept)), _rows(sl, a, min(b, kept))))
        if b > kept:
            parts.append(((max(a, kept), b), fill.expand(b - max(a, kept), *fill.shape[1:])))
        return parts


def _rows(sl: Any, a: int, b: int) -> torch.Tensor:
    return sl[a:b]  # type: ignore[no-any-return]


def _read(file: Any, name: str) -> torch.Tensor:
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)  # type: ignore[no-any-return]
    except (SafetensorError, OSError) as e:
        raise SourceError(f"{file}: cannot read tensor {name!r} to verify it ({e}); did the source change "
                          "while converting?") from e
