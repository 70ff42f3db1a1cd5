"""Reading a written rank file without trusting it: structure via a restricted unpickler, data via mmap.

`peek()` unpickles `data.pkl` with an unpickler that resolves only the globals a Megatron checkpoint
needs (`torch._utils._rebuild_tensor_v2`, storage and dtype names, `collections.OrderedDict`,
`argparse.Namespace`) and refuses everything else, so checking an untrusted file never runs its code.
Each tensor becomes a `StoredTensor` that knows its zip record; `tensor()` maps just that record.
"""

from __future__ import annotations

import argparse
import io
import mmap
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
STORAGE_DTYPES = {"BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
                  "DoubleStorage": torch.float64}


@dataclass(frozen=True)
class StoredTensor:
    record: str
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class TorchName:
    """A torch global seen in the pickle (a dtype such as torch.bfloat16), kept by name."""

    name: str


def _rebuild(storage: tuple[Any, ...], offset: int, size: tuple[int, ...], stride: tuple[int, ...],
             *_: Any) -> StoredTensor:
    _, storage_type, key, _location, _numel = storage
    dtype = STORAGE_DTYPES.get(storage_type.name)
    if dtype is None:
        raise pickle.UnpicklingError(f"unexpected storage type torch.{storage_type.name}")
    return StoredTensor(f"data/{key}", dtype, offset, tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if module == "torch" and (name.endswith("Storage") or name in ("bfloat16", "float16", "float32")):
            return TorchName(name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a checkpoint")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return pid


@dataclass
class RankFile:
    path: Path
    prefix: str
    content: dict[str, Any]
    data_offsets: dict[str, tuple[int, int]]

    @contextmanager
    def tensor(self, stored: StoredTensor) -> Iterator[torch.Tensor]:
        """The stored tensor as a read-only view of the mapped record (unmapped on exit)."""
        start, size = self.data_offsets[f"{self.prefix}/{stored.record}"]
        numel = 1
        for d in stored.shape:
            numel *= d
        itemsize = torch.empty(0, dtype=stored.dtype).element_size()
        if numel == 0:
            yield torch.empty(stored.shape, dtype=stored.dtype)
            return
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), start - base + size, prot=mmap.PROT_READ,
                                                   flags=MAP_FLAGS, offset=base) as m:
            view = memoryview(m)[start - base + stored.offset * itemsize:][: numel * itemsize]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write to it
                t = torch.frombuffer(view, dtype=stored.dtype).view(stored.shape)
            try:
                yield t
            finally:
                del t
                view.release()


def _data_offsets(f: BinaryIO, zf: zipfile.ZipFile) -> dict[str, tuple[int, int]]:
    out = {}
    for info in zf.infolist():
        f.seek(info.header_offset)
        head = f.read(30)
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


class _Window(io.RawIOBase):
    """Bytes [base, base + length) of a file, as a seekable file of its own (a zip archive inside a file)."""

    def __init__(self, f: BinaryIO, base: int, length: int) -> None:
        self._f, self._base, self._len, self._pos = f, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, [pos, self._pos + pos, self._len + pos][whence])
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        self._f.seek(self._base + self._pos)
        data = self._f.read(n)
        memoryview(b)[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _open(path: Path, base: int, length: int | None) -> tuple[str, Any, dict[str, tuple[int, int]]]:
    with path.open("rb") as raw:
        f: BinaryIO = raw if length is None else io.BufferedReader(_Window(raw, base, length))
        with zipfile.ZipFile(f) as zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl")), None)
            if pkl is None:
                raise ValueError(f"{path}: no data.pkl record at byte {base}: not a torch.save zip file")
            content = _RestrictedUnpickler(zf.open(pkl)).load()
            offsets = {k: (base + a, n) for k, (a, n) in _data_offsets(f, zf).items()}
    return pkl.rsplit("/", 1)[0], content, offsets


def peek(path: Path) -> RankFile:
    """Open a rank file: its top-level dict (tensors as `StoredTensor`) and where each record's data is."""
    prefix, content, offsets = _open(path, 0, None)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: the pickled object is a {type(content).__name__}, not a dict")
    return RankFile(path, prefix, content, offsets)


def peek_segment(path: Path, base: int, length: int) -> RankFile:
    """Open a `torch.save` archive stored at [base, base + length) of `path` (a DCP `.distcp` item); its
    pickled object is `content[""]`."""
    prefix, content, offsets = _open(path, base, length)
    return RankFile(path, prefix, {"": content}, offsets)
