"""The `data.pkl` of a `torch.save` file, produced without importing torch.

torch pickles (protocol 2) a tensor as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks)` and each storage as a persistent id `("storage", torch.<Type>Storage,
key, "cpu", numel)` whose bytes live in the zip record `data/<key>`. This module emits the same opcodes
for `TensorRef` placeholders, so the rank files are written by streaming bytes into those records while
the pickle stays exactly what `torch.load(weights_only=True)` expects. Everything else (dicts,
`argparse.Namespace`, numbers, None) is pickled by Python's own pickler.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

from ms2mg_converter.config import DType
from ms2mg_converter.model.megatron_args import TorchGlobal

STORAGE_TYPES = {DType.BF16: "BFloat16Storage", DType.FP16: "HalfStorage", DType.FP32: "FloatStorage"}


@dataclass(frozen=True)
class TensorRef:
    """A contiguous tensor whose bytes are the zip record `data/<key>`."""

    key: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def stride(self) -> tuple[int, ...]:
        out, acc = [], 1
        for d in reversed(self.shape):
            out.append(acc)
            acc *= d
        return tuple(reversed(out))


@dataclass(frozen=True, eq=False)
class _Storage:
    ref: TensorRef


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            r = obj.ref
            return ("storage", TorchGlobal("torch", STORAGE_TYPES[r.dtype]), r.key, "cpu", r.numel)
        return None

    def _save_global_ref(self, obj: TorchGlobal) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    def _save_tensor(self, obj: TensorRef) -> None:
        self.save(TorchGlobal("torch._utils", "_rebuild_tensor_v2"))  # type: ignore[attr-defined]
        args: tuple[object, ...] = (_Storage(obj), 0, obj.shape, obj.stride, False, OrderedDict())
        self.save(args)  # type: ignore[attr-defined]
        self.write(pickle.REDUCE)  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[TorchGlobal] = _save_global_ref
    dispatch[TensorRef] = _save_tensor


def dumps(obj: object) -> bytes:
    """Pickle `obj` (protocol 2, as torch.save) with `TensorRef`s as torch tensors."""
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()
