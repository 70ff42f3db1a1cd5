"""Test helper: cut a merged MindFormers checkpoint into a distributed one (`rank_N/` + strategy files).

Written from MindSpore's documented layout semantics, sharing no code with `source/distributed.py`: each
rank's slice is taken with `torch.chunk` (tensor parallel over the last device axis, optionally also the
data-parallel axis for the embedding, and the parallel optimizer's extra dim-0 cut over data parallel), and
the strategy is encoded here with a tiny protobuf *encoder* (or written as JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROW = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias", "word_embeddings.weight",
       "output_layer.weight")
COL = ("linear_proj.weight", "linear_fc2.weight")


@dataclass(frozen=True)
class Layout:
    tp: int = 2
    dp: int = 2
    pp: int = 1
    opt_shard: bool = False
    """Parallel optimizer: split weights are cut again along dim 0 over data parallel."""
    embedding_dp_tp: bool = False
    """The embedding's rows are cut over (dp, tp) together: a tensor_map entry listing two device axes."""
    fmt: str = "proto"
    """proto (unpacked repeated fields), proto-packed, or json."""
    extra_keys: bool = True


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(num << 3) + _varint(payload)
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _repeated(num: int, values: list[int], packed: bool) -> bytes:
    if packed:
        return _field(num, b"".join(_varint(v) for v in values))
    return b"".join(_field(num, v) for v in values)


def _proto(stage: int, layouts: dict[str, dict[str, object]], packed: bool) -> bytes:
    node = _field(1, b"net") + _field(2, _field(1, stage))
    out = _field(1, stage) + _field(2, node)
    for name, lay in layouts.items():
        dev = _field(1, _repeated(1, list(lay["dev_matrix"]), packed))  # type: ignore[call-overload]
        tmap = lay["tensor_map"]
        if any(isinstance(x, list) for x in tmap):  # type: ignore[attr-defined]
            maps = b"".join(_field(2, _repeated(1, x if isinstance(x, list) else [x], packed))
                            for x in tmap)  # type: ignore[attr-defined]
        else:
            maps = _field(2, _repeated(1, list(tmap), packed))  # type: ignore[call-overload]
        body = dev + maps + _field(5, 0) + _field(6, int(lay["opt_weight_shard_step"]))  # type: ignore[call-overload]
        body += _field(7, int(lay["opt_weight_shard_size"]))  # type: ignore[call-overload]
        out += _field(3, _field(1, name.encode()) + _field(2, body))
    return out


def _kind(name: str) -> str:
    if name.endswith(ROW):
        return "row"
    if name.endswith(COL):
        return "col"
    return "rep"


def _stage_of(name: str, layers: int, pp: int, tied: bool) -> list[int]:
    per = layers // pp
    if name.startswith("decoder.layers."):
        return [int(name.split(".")[2]) // per]
    if name.startswith("embedding."):
        return [0, pp - 1] if tied and pp > 1 else [0]
    return [pp - 1]


def _layout(name: str, t: torch.Tensor, lay: Layout) -> dict[str, object]:
    kind = _kind(name)
    opt = lay.opt_shard and kind != "rep" and lay.dp > 1
    if kind == "row" and lay.embedding_dp_tp and name.endswith("word_embeddings.weight"):
        tmap: list[object] = [[1, 0], -1]
        opt = False
    elif kind == "row":
        tmap = [0] + [-1] * (t.dim() - 1)
    elif kind == "col":
        tmap = [-1, 0]
    else:
        tmap = [-1] * t.dim()
    return {"dev_matrix": [lay.dp, lay.tp], "tensor_map": tmap, "param_split_shape": [], "indices_offset": [],
            "field": 0, "opt_weight_shard_step": 1 if opt else 0, "opt_weight_shard_size": lay.dp if opt else 0}


def _slice(t: torch.Tensor, spec: dict[str, object], d: int, k: int, lay: Layout) -> torch.Tensor:
    """Rank (dp d, tp k)'s slice, by torch.chunk."""
    tmap = spec["tensor_map"]
    if tmap == [[1, 0], -1]:
        return torch.chunk(t, lay.dp * lay.tp, 0)[d * lay.tp + k].clone()
    if tmap and tmap[0] == 0:  # type: ignore[index]
        t = torch.chunk(t, lay.tp, 0)[k]
    elif len(tmap) == 2 and tmap[1] == 0:  # type: ignore[arg-type, index]
        t = torch.chunk(t, lay.tp, 1)[k]
    if spec["opt_weight_shard_size"]:
        t = torch.chunk(t, lay.dp, 0)[d]
    return t.contiguous().clone()


def _load(src: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def distribute(src: Path, out: Path, lay: Layout, num_layers: int, tied: bool, *,
               strategy_dir: Path | None = None) -> Path:
    """Write `out/rank_N/net_rank_N-1_1.safetensors` and the strategy files; returns the strategy dir."""
    full = {k: v for k, v in _load(src).items() if not k.startswith(("adam_", "global_step", "epoch_num"))}
    devices = lay.dp * lay.tp
    sdir = strategy_dir or out.parent / "strategy"
    sdir.mkdir(parents=True, exist_ok=True)
    layouts = {name: _layout(name, t, lay) for name, t in full.items()}
    for rank in range(devices * lay.pp):
        stage, local = divmod(rank, devices)
        d, k = divmod(local, lay.tp)
        names = [n for n in full if stage in _stage_of(n, num_layers, lay.pp, tied)]
        tensors = {n: _slice(full[n], layouts[n], d, k, lay) for n in names}
        if lay.extra_keys:
            tensors.update({f"adam_m.{n}": torch.zeros_like(tensors[n]) for n in names[:3]})
            if rank % 2:  # a de-redundant optimizer state: on half the ranks only (never merged, so accepted)
                split = next(n for n in names if n.endswith("linear_qkv.weight"))
                tensors[f"adam_v.{split}"] = torch.zeros_like(tensors[split])
            tensors["global_step"] = torch.tensor([7], dtype=torch.int32)
        rdir = out / f"rank_{rank}"
        rdir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, rdir / f"net_rank_{rank}-1_1.safetensors", metadata={"format": "ms"})
        (rdir / "meta.json").write_text(json.dumps({"last_epoch": 1, "last_step": 1,
                                                    "last_ckpt_file": f"net_rank_{rank}-1_1.safetensors"}))
        mine = {n: layouts[n] for n in names}
        mine.update({f"adam_v.{n}": layouts[n] for n in names if n.endswith("linear_qkv.weight")})  # in the strategy
        if lay.fmt == "json":
            doc = {"current_stage": stage, "parallel_strategy_item": {"net": {"stage": stage}},
                   "parallel_layout_item": mine}
            (sdir / f"ckpt_strategy_rank_{rank}.json").write_text(json.dumps(doc))
        else:
            (sdir / f"ckpt_strategy_rank_{rank}.ckpt").write_bytes(_proto(stage, mine, lay.fmt == "proto-packed"))
    return sdir
