"""Reading the source checkpoint's safetensors headers: names, dtypes, shapes and byte ranges.

Only the JSON headers are read here, never tensor data, so the whole architecture can be inferred and
checked before any heavy I/O. The format (https://github.com/huggingface/safetensors): 8 bytes
little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, ...,
"__metadata__": {str: str}}`, then the data; offsets are relative to the end of the header.

Every check names the file and tensor and says what is wrong, so a truncated download or a corrupt file
is reported as such, not as a crash deep inside a reader.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ms2mg_converter.confine import check_source_path
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
class Piece:
    """One stored slice of a tensor in a distributed source: the box `start + shape` of the whole tensor,
    held contiguously (row-major) at byte `offset` of `file`."""

    file: Path
    offset: int
    start: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives: file, absolute byte offset of its data, dtype and shape.

    A tensor of a distributed source (`source/distributed.py`) that is cut over ranks has `pieces`: its
    slices, which tile `shape` exactly; `file` and `offset` are then the first piece's (for messages)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    pieces: tuple[Piece, ...] = ()
    block: tuple[int, int] | None = None
    """(index, count): this is block `index` of `count` equal blocks of the stored tensor `name`, stored as
    the transpose of `shape` (a MindFormers grouped expert weight, `source.experts`); `offset` is the block's."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SourceFile:
    path: Path
    size: int
    header_bytes: int
    header_sha256: str = ""
    """sha256 of the JSON header: names, dtypes, shapes and offsets (content is fingerprinted separately)."""


@dataclass(frozen=True)
class SourceIndex:
    """All tensors of a checkpoint, from one or more safetensors files."""

    files: tuple[SourceFile, ...]
    tensors: dict[str, TensorInfo]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class _DuplicateName(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`json` object hook: a name given twice is an error (a parser would silently keep one of them), and so
    is a lone UTF-16 surrogate escape (`\\ud800`), which Python's json accepts and safetensors refuses."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateName(key)
        for text in (key, value) if isinstance(value, str) else (key,):
            text.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
        out[key] = value
    return out


def _bad(path: Path, what: str) -> SourceError:
    return SourceError(f"{path}: {what}. The file is not a valid safetensors file (truncated download, "
                       "interrupted copy or another format?); re-export or re-copy it.")


def _read_header(path: Path) -> tuple[dict[str, object], int, int, str]:
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
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs)
    except _DuplicateName as e:
        raise _bad(path, f"its header names {e.name!r} twice") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"its {n}-byte JSON header does not parse ({e})") from e
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    return header, n, size, hashlib.sha256(raw).hexdigest()


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _bad(path, f"tensor {name!r} has the unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
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


def _check_layout(path: Path, infos: list[TensorInfo], data_start: int, data_len: int) -> None:
    """Tensors must not overlap and must tile the data section exactly, as the safetensors library demands.

    A gap or trailing bytes mean a damaged or foreign file; the library (which `ms2mg verify` uses) refuses
    such a file, so it is refused here, before anything is written.
    """
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in infos if t.nbytes)
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise _bad(path, f"the data of tensors {a!r} and {b!r} overlap")
    pos = 0
    for t in sorted(infos, key=lambda t: (t.offset, t.nbytes)):
        begin = t.offset - data_start
        if begin != pos:
            raise _bad(path, f"bytes {pos} to {begin} of its data section, before tensor {t.name!r}, belong to "
                             "no tensor (the safetensors format has no gaps)")
        pos = begin + t.nbytes
    if pos != data_len:
        raise _bad(path, f"its last {data_len - pos} bytes belong to no tensor (the tensors end at byte {pos} of "
                         f"the {data_len}-byte data section)")


def read_file(path: Path) -> tuple[SourceFile, list[TensorInfo]]:
    """Parse and check one safetensors file's header."""
    header, n, size, digest = _read_header(path)
    data_start = 8 + n
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _bad(path, "its __metadata__ is not an object of strings")
    infos = [_tensor_info(path, name, entry, data_start, size - data_start)
             for name, entry in header.items() if name != "__metadata__"]
    _check_layout(path, infos, data_start, size - data_start)
    return SourceFile(path, size, n, digest), infos


def _files_of(load: Path) -> list[Path]:
    try:
        return _list_files(load)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(load) else ""
        hint = "; check the permissions of the directory and its files" if isinstance(e, PermissionError) else ""
        raise SourceError(f"--load-dir {load}: cannot be read: {e.strerror or e}{where}{hint}.") from e


def _list_files(load: Path) -> list[Path]:
    if load.is_file():
        return [load]
    if not load.exists():
        raise SourceError(f"--load-dir {load}: no such file or directory.")
    if not load.is_dir():
        raise SourceError(f"--load-dir {load}: not a file or directory.")
    index = load / INDEX_NAME
    if index.is_file():
        return _files_from_index(index)
    files = sorted(p for p in load.iterdir() if p.name.endswith(".safetensors"))  # unlike glob, reports EACCES
    if not files:
        raise SourceError(f"--load-dir {load}: the directory holds no *.safetensors file (and no {INDEX_NAME}). "
                          "Point --load-dir at the MindFormers checkpoint directory or file.")
    return files


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except PermissionError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}.") from e
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise SourceError(f"{index}: 'weight_map' must map tensor names to shard file names.")
    for name in set(weight_map.values()):
        if Path(name).is_absolute() or ".." in Path(name).parts or not name:
            raise SourceError(f"{index}: the shard name {name!r} is not a file inside the checkpoint directory; "
                              "ms2mg reads no file outside --load-dir.")
    return weight_map


def _files_from_index(index: Path) -> list[Path]:
    names = sorted(set(_read_index(index).values()))
    files = [index.parent / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{index} lists files that do not exist: {', '.join(missing[:5])}. "
                          "The checkpoint is incomplete; copy the missing shards.")
    return files


def _check_index(index: Path, tensors: dict[str, TensorInfo]) -> None:
    weight_map = _read_index(index)
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file != index.parent / file:
            where = "is in no file" if info is None else f"is in {info.file.name}"
            raise SourceError(f"{index}: the index puts tensor {name!r} in {file}, but it {where}.")


def open_source(load: Path, root: Path | None = None, strategy: Path | None = None,
                suffix: str | None = None) -> SourceIndex:
    """Index every tensor of a checkpoint (file, directory of shards, or directory with an index; or a
    distributed checkpoint of `rank_N/` directories, merged logically by `source.distributed`).

    With `root`, `load` and every file must resolve inside it (checked before each file is opened)."""
    check_source_path(load, root, "--load-dir")
    from ms2mg_converter.source import distributed  # below: it reads rank files with read_file

    if strategy is not None or distributed.is_distributed(load):
        return distributed.open_distributed(load, root, strategy, suffix)
    files: list[SourceFile] = []
    tensors: dict[str, TensorInfo] = {}
    for path in _files_of(load):
        check_source_path(path, root)
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
