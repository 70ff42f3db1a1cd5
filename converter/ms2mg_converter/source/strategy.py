"""MindSpore parallel strategy files (`ckpt_strategy_rank_*.ckpt`, or the `.json` variant), read without MindSpore.

A strategy file is a protobuf `mindspore.straspb.ParallelStrategyMap` (proto2). Only the layout fields are
needed, so the wire format is decoded here by hand (varints and length-delimited fields; repeated scalars
packed or not; `int32 -1` as a ten-byte varint); the field numbers are MindSpore's `node_strategy.proto`:

    ParallelStrategyMap  1 current_stage, 2 parallel_strategy_item, 3 parallel_layout_item
    ParallelStrategyItem 1 node_name, 2 ParallelStrategys {1 stage, 2 parallel_strategy}
    ParallelLayoutItem   1 param_name, 2 ParallelLayouts {1 dev_matrix {1 dim}, 2 tensor_map {1 dim},
                         3 param_split_shape, 4 indices_offset, 5 field, 6 opt_weight_shard_step,
                         7 opt_weight_shard_size}

Absent fields read as 0 (older protos lack 6 and 7). What a layout means is in `source/distributed.py`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ms2mg_converter.errors import SourceError

Fields = dict[int, list[int | bytes]]


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is cut over the devices of a pipeline stage."""

    dev_matrix: tuple[int, ...]
    """Device-axis sizes, row-major: the last entry varies fastest with the rank."""
    tensor_map: tuple[tuple[int, ...], ...]
    """Per tensor axis, the device axes that cut it (first = most significant); value v names device axis
    len(dev_matrix) - 1 - v, -1 means not cut."""
    opt_shard_step: int = 0
    opt_shard_size: int = 0
    field: int = 0

    @property
    def devices(self) -> int:
        n = 1
        for d in self.dev_matrix:
            n *= d
        return n


@dataclass(frozen=True)
class StageStrategy:
    stage: int
    layouts: dict[str, ParamLayout]
    file: Path


def _varint(buf: bytes, pos: int, path: Path) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise SourceError(f"{path}: truncated or corrupt protobuf (a varint runs past the end); the strategy "
                              "file is damaged: copy it again from the training job's output/strategy/.")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes, path: Path) -> Fields:
    """The message's fields: number -> values (ints for varint/fixed, bytes for length-delimited)."""
    out: Fields = defaultdict(list)
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, path)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, path)
            out[num].append(value)
        elif wire == 2:
            n, pos = _varint(buf, pos, path)
            if pos + n > len(buf):
                raise SourceError(f"{path}: truncated protobuf (field {num} needs {n} bytes); the strategy file "
                                  "is damaged: copy it again.")
            out[num].append(buf[pos:pos + n])
            pos += n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out[num].append(int.from_bytes(buf[pos:pos + size], "little"))
            pos += size
        else:
            raise SourceError(f"{path}: not a MindSpore strategy file (protobuf wire type {wire} in field {num}). "
                              "Pass the ckpt_strategy_rank_*.ckpt (or .json) the training job wrote.")
    return out


def _ints(values: list[int | bytes], path: Path, signed: bool = False) -> list[int]:
    """A repeated integer field, unpacked (varints) or packed (one length-delimited run)."""
    out: list[int] = []
    for v in values:
        if isinstance(v, bytes):
            pos = 0
            while pos < len(v):
                x, pos = _varint(v, pos, path)
                out.append(x)
        else:
            out.append(v)
    if signed:
        out = [x - (1 << 64) if x >= 1 << 63 else x for x in out]
    return out


def _one(fields: Fields, num: int, path: Path) -> int:
    values = _ints(fields.get(num, []), path, signed=True)
    return values[-1] if values else 0


def _msgs(fields: Fields, num: int) -> list[bytes]:
    return [v for v in fields.get(num, []) if isinstance(v, bytes)]


def _layout(raw: bytes, name: str, path: Path) -> ParamLayout:
    f = _fields(raw, path)
    devs = [_ints(_fields(m, path).get(1, []), path) for m in _msgs(f, 1)]
    maps = [tuple(_ints(_fields(m, path).get(1, []), path, signed=True)) for m in _msgs(f, 2)]
    if not devs:
        raise SourceError(f"{path}: parameter {name!r} has no dev_matrix; the strategy file is incomplete.")
    return _make(name, devs[0], maps, _one(f, 6, path), _one(f, 7, path), _one(f, 5, path), path)


def _make(name: str, dev: list[int], maps: list[tuple[int, ...]], step: int, size: int, field: int,
          path: Path) -> ParamLayout:
    tensor_map = tuple((v,) for v in maps[0]) if len(maps) == 1 else tuple(maps)
    for axis in tensor_map:
        for v in axis:
            if v != -1 and not 0 <= v < len(dev):
                raise SourceError(f"{path}: parameter {name!r} maps a tensor axis to device axis {v}, but its "
                                  f"dev_matrix {dev} has {len(dev)} axes; the strategy file is corrupt.")
    if any(d < 1 for d in dev):
        raise SourceError(f"{path}: parameter {name!r} has the dev_matrix {dev}; sizes must be positive.")
    return ParamLayout(tuple(dev), tensor_map, step, size, field)


def _parse_proto(path: Path, raw: bytes) -> tuple[int, dict[str, ParamLayout]]:
    top = _fields(raw, path)
    stage = _one(top, 1, path)
    items = _msgs(top, 2)
    if items:
        strategys = _msgs(_fields(items[0], path), 2)
        if strategys:
            stage = _one(_fields(strategys[0], path), 1, path)
    layouts: dict[str, ParamLayout] = {}
    for item in _msgs(top, 3):
        f = _fields(item, path)
        names, bodies = _msgs(f, 1), _msgs(f, 2)
        if not names or not bodies:
            raise SourceError(f"{path}: a parallel_layout_item lacks its param_name or layouts; the strategy "
                              "file is corrupt.")
        name = names[0].decode("utf-8", "replace")
        layouts[name] = _layout(bodies[0], name, path)
    return stage, layouts


def _json_ints(value: object, what: str, path: Path) -> list[int]:
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        value = value[0]  # [[...]]: the first (only) dev matrix
    if not (isinstance(value, list) and all(type(v) is int for v in value)):
        raise SourceError(f"{path}: {what} must be a list of integers, not {value!r}.")
    return value


def _json_layout(name: str, entry: object, path: Path) -> ParamLayout:
    if not isinstance(entry, dict):
        raise SourceError(f"{path}: parallel_layout_item[{name!r}] must be an object.")
    dev = _json_ints(entry.get("dev_matrix"), f"{name!r} dev_matrix", path)
    raw_map = entry.get("tensor_map")
    if not isinstance(raw_map, list):
        raise SourceError(f"{path}: {name!r} tensor_map must be a list, not {raw_map!r}.")
    maps = [tuple(v) if isinstance(v, list) else (v,) for v in raw_map]
    if not all(type(x) is int for axis in maps for x in axis):
        raise SourceError(f"{path}: {name!r} tensor_map must hold integers (or lists of them): {raw_map!r}.")
    step, size, field = (entry.get(k, 0) for k in ("opt_weight_shard_step", "opt_weight_shard_size", "field"))
    if not all(type(v) is int for v in (step, size, field)):
        raise SourceError(f"{path}: {name!r} opt_weight_shard_step/size and field must be integers.")
    return _make(name, dev, [tuple(x for m in maps for x in m)] if all(len(m) == 1 for m in maps) else maps,
                 int(str(step)), int(str(size)), int(str(field)), path)


def _parse_json(path: Path, raw: bytes) -> tuple[int, dict[str, ParamLayout]]:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise SourceError(f"{path}: not a JSON strategy file ({e}).") from e
    items = doc.get("parallel_layout_item") if isinstance(doc, dict) else None
    if not isinstance(items, dict):
        raise SourceError(f"{path}: a JSON strategy file needs a 'parallel_layout_item' object.")
    stage = doc.get("current_stage", 0)
    nodes = doc.get("parallel_strategy_item")
    if isinstance(nodes, dict) and nodes:
        first = next(iter(nodes.values()))
        if isinstance(first, dict) and type(first.get("stage")) is int:
            stage = first["stage"]
    if type(stage) is not int:
        raise SourceError(f"{path}: current_stage must be an integer.")
    return stage, {name: _json_layout(name, e, path) for name, e in items.items()}


_STAGE_PREFIX = re.compile(r"^(\d+)-(.+)$")


def read_strategy(path: Path) -> list[StageStrategy]:
    """One strategy file as its pipeline stages (one for a per-rank file; several for a file merged by
    `merge_pipeline_strategys`, whose parameter names carry a `"{stage}-"` prefix)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SourceError(f"--src-strategy {path}: cannot be read ({e.strerror or e}).") from e
    stage, layouts = _parse_json(path, raw) if path.suffix == ".json" else _parse_proto(path, raw)
    if not layouts:
        raise SourceError(f"{path}: the strategy file holds no parameter layouts; is it the strategy of this "
                          "training job (output/strategy/ckpt_strategy_rank_*.ckpt)?")
    for name, lay in layouts.items():
        if lay.field != 0:
            raise SourceError(f"{path}: parameter {name!r} has field={lay.field} (a host-offloaded or "
                              "embedding-cache layout); only ordinary training layouts are supported.")
    matches = {n: _STAGE_PREFIX.match(n) for n in layouts}
    if all(matches.values()):
        per: dict[int, dict[str, ParamLayout]] = defaultdict(dict)
        for n, m in matches.items():
            assert m is not None
            per[int(m.group(1))].setdefault(m.group(2), layouts[n])  # the lowest stage wins, as in MindSpore
        return [StageStrategy(s, dict(per[s]), path) for s in sorted(per)]
    return [StageStrategy(stage, layouts, path)]
