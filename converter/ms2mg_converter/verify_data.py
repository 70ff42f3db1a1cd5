"""Expected tensor shards for `ms2mg verify`, computed from the source with torch and `safetensors`.

Fused tensors (linear_qkv, SwiGLU linear_fc1) are rebuilt whole with `reference_ops` and split with
Megatron's TP rules; everything else is a plain copy, a column split or the vocabulary table, compared
in row blocks so memory stays small even for a large embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors import safe_open

from ms2mg_converter import reference_ops as ref
from ms2mg_converter.config import Fc1Layout, PadFill, QkvLayout
from ms2mg_converter.plan import Plan, TensorEntry
from ms2mg_converter.resolve import Logical, resolve
from ms2mg_converter.tables import OpKind
from ms2mg_converter.target import Split, split_of

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCK_BYTES = 16 * 1024 * 1024
FUSED = (OpKind.QKV_FUSED, OpKind.QKV_SPLIT, OpKind.GLU_FUSED, OpKind.GLU_SPLIT)


def describe_mismatch(got: torch.Tensor, exp: torch.Tensor) -> str | None:
    """None when equal bit for bit (NaN matching NaN); else a short description."""
    exp = exp.to(got.dtype)
    if got.shape != exp.shape:
        return f"shape {list(got.shape)} != expected {list(exp.shape)}"
    if torch.equal(got, exp):
        return None
    same = (got == exp) | (torch.isnan(got) & torch.isnan(exp))
    if bool(same.all()):
        return None
    bad = int((~same).sum())
    first = tuple(int(i) for i in (~same).nonzero()[0])
    return (f"{bad} of {got.numel()} values differ (first at index {first}: {got[first].item()} vs "
            f"{exp[first].item()})")


class ExpectedTensors:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.arch = plan.arch
        self.cfg = plan.config
        view = resolve(plan.source, plan.config.ignore_keys)
        self.by_name: dict[str, Logical] = {lg.name: lg for lg in view.logical.values()}
        self._cache: tuple[str, torch.Tensor] | None = None

    def mismatch(self, entry: TensorEntry, tp_rank: int, got: torch.Tensor) -> str | None:
        logical = self.by_name[entry.source]
        kind = split_of(logical.target)
        dtype = TORCH_DTYPES[entry.dtype]
        if logical.recipe.op in FUSED and (self.arch.swiglu or logical.recipe.op not in (OpKind.GLU_FUSED,)):
            full = self._fused(logical, dtype)
            shard = ref.tp_split(full, kind, self.cfg.tensor_parallel, self.arch.swiglu)[tp_rank]
            return describe_mismatch(got, shard)
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
        with safe_open(str(info.file), framework="pt") as f:
            sl = f.get_slice(info.name)
            for a in range(lo, hi, step):
                b = min(hi, a + step)
                exp = self._vocab_rows(sl, a, b) if kind is Split.VOCAB else _rows(sl, a, b)
                if len(info.shape) > 1:
                    exp = exp[:, col]
                bad = describe_mismatch(got[a - lo: b - lo], exp)
                if bad:
                    return f"rows {a}..{b}: {bad}"
        return None

    def _vocab_rows(self, sl: Any, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the padded table (Megatron's `pad_weight`, or zeros past the true vocab)."""
        rows = self.arch.source_vocab_rows
        if self.cfg.vocab.pad_fill is PadFill.ZERO:
            kept = self.arch.true_vocab_size or rows
            fill = None
        else:
            kept = min(rows, self.arch.padded_vocab_size)
            fill = _rows(sl, rows - 1, rows)
        head = _rows(sl, a, min(b, kept)) if a < kept else None
        n_fill = b - max(a, kept)
        parts = [head] if head is not None else []
        if n_fill > 0:
            template = fill if fill is not None else torch.zeros_like(_rows(sl, 0, 1))
            parts.append(template.expand(n_fill, *template.shape[1:]))
        return torch.cat(parts, dim=0)


def _rows(sl: Any, a: int, b: int) -> torch.Tensor:
    return sl[a:b]  # type: ignore[no-any-return]


def _read(file: Any, name: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)  # type: ignore[no-any-return]
