"""Reading the source checkpoint's safetensors headers: names, dtypes, shapes and byte ranges.

Only the JSON headers are read here, never tensor data, so the whole architecture can be inferred and
checked before any heavy I/O. The format (https://github.com/huggingface/safetensors): 8 bytes
little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, ...,
"__metadata__": {str: str}}`, then the data; offsets are relative to the end of the header.

Every check names the file and tensor and says what is wrong, so a truncated download or a corrupt file
is reported as such, not as a crash deep inside a reader.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ms2mg_converter.errors import SourceError

DTYPE_SIZES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
                               "BOOL": 1}
"""Every dtype a safetensors header may name (a key with another dtype is a corrupt header)."""
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""The dtypes of weights the converter can read and cast."""

MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives: file, absolute byte offset of its data, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SourceFile:
    path: Path
    size: int
    header_bytes: int


@dataclass(frozen=True)
class SourceIndex:
    """All tensors of a checkpoint, from one or more safetensors files."""

    files: tuple[SourceFile, ...]
    tensors: dict[str, TensorInfo]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _bad(path: Path, what: str) -> SourceError:
    return SourceError(f"{path}: {what}. The file is not a valid safetensors file (truncated download, "
                       "interrupted copy or another format?); re-export or re-copy it.")


def _read_header(path: Path) -> tuple[dict[str, object], int, int]:
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _bad(path, f"it is {size} bytes long, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise _bad(path, f"its header claims {n} bytes but the file has {size - 8} after the length")
            raw = f.read(n)
    except PermissionError as e:
        raise SourceError(f"{path}: cannot be read ({e.strerror}); check the file's permissions.") from e
    except OSError as e:
        raise SourceError(f"{path}: cannot be read ({e.strerror or e}).") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(path, f"its {n}-byte JSON header does not parse ({e})") from e
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    return header, n, size


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _bad(path, f"tensor {name!r} has the unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if not 0 <= begin <= end or end - begin != expected:
        raise _bad(path, f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes but data_offsets "
                         f"{offsets} span {end - begin}")
    if end > data_len:
        raise _bad(path, f"tensor {name!r} ends at byte {end} of the data section, but the file holds only "
                         f"{data_len} data bytes")
    return TensorInfo(name, str(dtype), tuple(shape), path, data_start + begin, end - begin)


def read_file(path: Path) -> tuple[SourceFile, list[TensorInfo]]:
    """Parse and check one safetensors file's header."""
    header, n, size = _read_header(path)
    data_start = 8 + n
    infos = [_tensor_info(path, name, entry, data_start, size - data_start)
             for name, entry in header.items() if name != "__metadata__"]
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in infos if t.nbytes)
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise _bad(path, f"the data of tensors {a!r} and {b!r} overlap")
    return SourceFile(path, size, n), infos


def _files_of(load: Path) -> list[Path]:
    if load.is_file():
        return [load]
    if not load.exists():
        raise SourceError(f"--load-dir {load}: no such file or directory.")
    if not load.is_dir():
        raise SourceError(f"--load-dir {load}: not a file or directory.")
    index = load / INDEX_NAME
    if index.is_file():
        return _files_from_index(index)
    files = sorted(load.glob("*.safetensors"))
    if not files:
        raise SourceError(f"--load-dir {load}: the directory holds no *.safetensors file (and no {INDEX_NAME}). "
                          "Point --load-dir at the MindFormers checkpoint directory or file.")
    return files


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}.") from e
    files = [index.parent / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{index} lists files that do not exist: {', '.join(missing[:5])}. "
                          "The checkpoint is incomplete; copy the missing shards.")
    return files


def _check_index(index: Path, tensors: dict[str, TensorInfo]) -> None:
    weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != file:
            where = "is in no file" if info is None else f"is in {info.file.name}"
            raise SourceError(f"{index}: the index puts tensor {name!r} in {file}, but it {where}.")


def open_source(load: Path) -> SourceIndex:
    """Index every tensor of a checkpoint (file, directory of shards, or directory with an index)."""
    files: list[SourceFile] = []
    tensors: dict[str, TensorInfo] = {}
    for path in _files_of(load):
        sf, infos = read_file(path)
        files.append(sf)
        for info in infos:
            if info.name in tensors:
                raise SourceError(f"tensor {info.name!r} is stored twice: in {tensors[info.name].file} and in "
                                  f"{path}. Remove the stale shard from --load-dir.")
            tensors[info.name] = info
    if load.is_dir() and (load / INDEX_NAME).is_file():
        _check_index(load / INDEX_NAME, tensors)
    return SourceIndex(tuple(files), tensors)
