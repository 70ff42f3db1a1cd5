"""A distributed MindFormers checkpoint (`rank_N/*.safetensors` + a parallel strategy) as one logical index.

MindFormers' legacy ("Checkpoint 1.0") save writes one safetensors file per rank holding that rank's slice of
every parameter of its pipeline stage, under global names, plus a strategy file per rank
(`output/strategy/ckpt_strategy_rank_N.ckpt`). Rank r is device r % S of stage r // S (S = devices per
stage). A parameter's slice on device i follows MindSpore's layout rules:

* `coord[j] = (i // prod(D[j+1:])) % D[j]` for every axis j of the dev_matrix D (row-major);
* tensor axis k is cut by the device axes of `tensor_map[k]` (value v is axis len(D)-1-v; the first listed
  is the most significant); -1 means not cut (replicated over that axis);
* with the parallel optimizer (`opt_weight_shard_size`, -1 = all remaining devices), dim 0 of that slice is
  cut again over the unused ("repeated") device axes, consumed from the right.

Only headers are read here: each tensor becomes a `TensorInfo` whose `pieces` (one per distinct slice, read
from the lowest rank holding it) tile its global shape, checked exactly (no gap, no overlap), so replicated
copies are read once and a de-redundant save (each slice on one rank only) works. Nothing is merged on
disk: `stream/gather.py` reads the pieces row window by row window while converting.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ms2mg_converter.confine import check_source_path
from ms2mg_converter.errors import SourceError
from ms2mg_converter.source.families.dropped import is_dropped
from ms2mg_converter.source.index import DTYPE_SIZES, Piece, SourceFile, SourceIndex, TensorInfo, read_file
from ms2mg_converter.source.strategy import ParamLayout, StageStrategy, read_strategy

RANK_DIR = re.compile(r"^rank_(\d+)$")
_EPOCH_STEP = re.compile(r"-(\d+)_(\d+)\.safetensors$")
def strategy_dirs(load: Path) -> list[Path]:
    """Where the strategy files are looked for: `<load>/strategy`, then `<load>/../strategy` (MindFormers writes
    output/checkpoint/ and output/strategy/ side by side)."""
    return [load / "strategy", load.parent / "strategy"]


def is_distributed(load: Path) -> bool:
    """`load` holds rank_N/ directories (an unreadable directory is left to the merged-source listing, which
    reports it)."""
    try:
        return load.is_dir() and any(RANK_DIR.match(p.name) and p.is_dir() for p in load.iterdir())
    except OSError:
        return False


def _rank_dirs(load: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in load.iterdir() if (m := RANK_DIR.match(p.name)) and p.is_dir()}
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise SourceError(f"--load-dir {load}: rank director{'ies' if len(missing) > 1 else 'y'} "
                          f"{', '.join(f'rank_{r}' for r in missing[:8])} missing (found rank_0..rank_{max(found)} "
                          "with gaps). Copy every rank's directory of the distributed checkpoint.")
    return [found[r] for r in sorted(found)]


def _pick_file(rank_dir: Path, suffix: str | None) -> Path:
    files = sorted(p for p in rank_dir.iterdir() if p.name.endswith(".safetensors") and p.is_file())
    if suffix is not None:
        exact = [p for p in files if p.name.endswith(f"-{suffix}.safetensors")]  # 1_1 must not pick -11_1
        files = exact or [p for p in files if p.name.endswith(f"{suffix}.safetensors")]
        if len(files) != 1:
            raise SourceError(f"{rank_dir}: {len(files)} files end in {suffix}.safetensors (--src-ckpt-suffix); "
                              "exactly one is needed.")
        return files[0]
    if not files:
        raise SourceError(f"{rank_dir}: no *.safetensors file; the rank's checkpoint is missing. Copy it, or "
                          "point --load-dir at the directory holding the rank_N/ directories.")
    meta = rank_dir / "meta.json"
    if len(files) > 1 and meta.is_file():
        try:
            last = json.loads(meta.read_text(encoding="utf-8")).get("last_ckpt_file")
        except (OSError, ValueError, AttributeError):
            last = None
        if isinstance(last, str) and (rank_dir / Path(last).name).is_file():
            return rank_dir / Path(last).name
    stepped = [(tuple(int(g) for g in m.groups()), p) for p in files if (m := _EPOCH_STEP.search(p.name))]
    if len(files) > 1 and len(stepped) != len(files):
        raise SourceError(f"{rank_dir}: {len(files)} checkpoint files ({', '.join(p.name for p in files[:4])}) "
                          "and no epoch_step numbers to choose the last; pass --src-ckpt-suffix (e.g. 2_100).")
    return max(stepped)[1] if len(files) > 1 else files[0]


def _strategy_files(load: Path, given: Path | None, root: Path | None) -> list[Path]:
    if given is not None:
        if given.is_file():
            check_source_path(given, root)
            return [given]
        if not given.is_dir():
            raise SourceError(f"--src-strategy {given}: no such file or directory.")
        dirs = [given]
    else:
        dirs = [d for d in strategy_dirs(load) if d.is_dir()]
    for d in dirs:
        files = sorted(p for p in d.iterdir() if p.suffix in (".ckpt", ".json") and p.is_file())
        for f in files:
            check_source_path(f, root)  # the strategy is read like the source: inside --load-root
        if files:
            return files
    where = " or ".join(map(str, strategy_dirs(load))) if given is None else str(given)
    raise SourceError(f"--load-dir {load} is a distributed checkpoint (rank_N/ directories) but no strategy file "
                      f"was found in {where}. Pass --src-strategy with the training job's "
                      "output/strategy/ directory or one ckpt_strategy_rank_N.ckpt (or .json) file.")


def _stages(files: list[Path]) -> dict[int, StageStrategy]:
    stages: dict[int, StageStrategy] = {}
    for f in files:
        for st in read_strategy(f):
            stages.setdefault(st.stage, st)  # every rank of a stage writes the same strategy
    return stages


def _stage_devices(st: StageStrategy) -> int:
    sizes = {lay.devices for lay in st.layouts.values()}
    if len(sizes) != 1:
        raise SourceError(f"{st.file}: the layouts of stage {st.stage} have dev_matrix products {sorted(sizes)}; "
                          "all parameters of a stage must span the same devices.")
    return sizes.pop()


@dataclass
class _Found:
    """The slices of one parameter seen so far (in one pipeline stage)."""

    stage: int
    dtype: str
    shape: tuple[int, ...]
    first: str
    pieces: dict[tuple[tuple[int, int], ...], Piece]
    ranks: list[int]


def _axis_devices(lay: ParamLayout, k: int) -> list[int]:
    return [len(lay.dev_matrix) - 1 - v for v in lay.tensor_map[k] if v != -1]


def _opt_size(lay: ParamLayout, splits: int, devices: int) -> int:
    size = lay.opt_shard_size
    return devices // splits if size == -1 else max(size, 0)


def _opt_index(lay: ParamLayout, coord: list[int], size: int, where: str) -> int:
    mapped = {j for k in range(len(lay.tensor_map)) for j in _axis_devices(lay, k)}
    rem, parts = size, list[tuple[int, int]]()
    for j in reversed([j for j, d in enumerate(lay.dev_matrix) if j not in mapped and d > 1]):
        take = min(lay.dev_matrix[j], rem)
        parts.insert(0, (coord[j] % take, take))
        rem //= take
        if rem == 1:
            break
    if rem != 1:
        raise SourceError(f"{where}: opt_weight_shard_size {size} does not fit the unused device axes of "
                          f"dev_matrix {list(lay.dev_matrix)}; the strategy file does not match this checkpoint.")
    o = 0
    for idx, take in parts:
        o = o * take + idx
    return o


def slice_box(lay: ParamLayout, device: int, local: tuple[int, ...], where: str) -> tuple[
        tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(global shape, [begin, end) per axis) of the slice of shape `local` that `device` holds."""
    if len(lay.tensor_map) != len(local):
        raise SourceError(f"{where}: the tensor has {len(local)} axes {list(local)} but the strategy maps "
                          f"{len(lay.tensor_map)}; the strategy file does not belong to this checkpoint.")
    dev = lay.dev_matrix
    coord = [(device // math.prod(dev[j + 1:])) % dev[j] for j in range(len(dev))]
    counts = [math.prod(dev[a] for a in _axis_devices(lay, k)) for k in range(len(local))]
    osz = _opt_size(lay, math.prod(counts), lay.devices) if local else 0
    shape = tuple(n * c * (osz if k == 0 and osz > 1 else 1) for k, (n, c) in enumerate(zip(local, counts,
                                                                                          strict=True)))
    box = []
    for k, n in enumerate(shape):
        sid = 0
        for a in _axis_devices(lay, k):
            sid = sid * dev[a] + coord[a]
        size = n // counts[k]
        box.append((sid * size, (sid + 1) * size))
    if osz > 1:
        sub = (box[0][1] - box[0][0]) // osz
        o = _opt_index(lay, coord, osz, where)
        box[0] = (box[0][0] + o * sub, box[0][0] + (o + 1) * sub)
    return shape, tuple(box)


@dataclass
class _Scan:
    files: list[SourceFile]
    found: dict[str, _Found]
    plain: dict[str, TensorInfo]
    rank_files: dict[int, Path]


def _add(scan: _Scan, info: TensorInfo, lay: ParamLayout, stage: int, rank: int, device: int) -> None:
    where = f"{info.file} tensor {info.name!r}"
    shape, box = slice_box(lay, device, info.shape, where)
    f = scan.found.get(info.name)
    if f is not None and f.stage != stage:
        return  # a parameter on several stages (tied embeddings): the lowest stage's copy is used
    if f is None:
        f = scan.found[info.name] = _Found(stage, info.dtype, shape, str(info.file), {}, [])
    if (f.shape, f.dtype) != (shape, info.dtype):
        raise SourceError(f"{where}: the slice {info.dtype} {list(info.shape)} implies the whole tensor "
                          f"{list(shape)} under the strategy, but {f.first} implies {f.dtype} "
                          f"{list(f.shape)}. The rank files do not match each other or the strategy "
                          "(--src-strategy from another run?).")
    f.ranks.append(rank)
    f.pieces.setdefault(box, Piece(info.file, info.offset, tuple(b for b, _ in box), info.shape))


def _scan(load: Path, root: Path | None, stages: dict[int, StageStrategy], devices: int,
          suffix: str | None) -> _Scan:
    scan = _Scan([], {}, {}, {})
    for rank, rank_dir in enumerate(_rank_dirs(load)):
        path = _pick_file(rank_dir, suffix)
        check_source_path(path, root)
        sf, infos = read_file(path)
        scan.files.append(sf)
        scan.rank_files[rank] = path
        stage = stages[rank // devices]
        for info in infos:
            lay = stage.layouts.get(info.name)
            if lay is not None and not is_dropped(info.name):  # optimizer state is never read: not merged
                _add(scan, info, lay, stage.stage, rank, rank % devices)
            else:
                _add_plain(scan, info)
    return scan


def _add_plain(scan: _Scan, info: TensorInfo) -> None:
    """A tensor the strategy does not describe (optimizer scalars, bookkeeping): the same on every rank (a
    rank-local optimizer slice, which the converter drops anyway, is taken from the lowest rank)."""
    seen = scan.plain.setdefault(info.name, info)
    if (seen.shape, seen.dtype) != (info.shape, info.dtype) and not is_dropped(info.name):
        raise SourceError(f"tensor {info.name!r} is {seen.dtype} {list(seen.shape)} in {seen.file} but "
                          f"{info.dtype} {list(info.shape)} in {info.file}, and the strategy file does not say how "
                          "it is cut. Pass the strategy file of this training run (--src-strategy).")


def _cells(pieces: list[tuple[tuple[int, int], ...]], shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """The grid cells (indices into each axis' cut points) that each piece covers, piece after piece."""
    cuts = [sorted({0, n, *(b for p in pieces for b in p[k])}) for k, n in enumerate(shape)]
    for p in pieces:
        ranges = [range(cuts[k].index(b), cuts[k].index(e)) for k, (b, e) in enumerate(p)]
        yield from _product(ranges)


def _product(ranges: list[range]) -> Iterator[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for i in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (i, *rest)


def check_coverage(name: str, f: _Found, ranks_of_stage: list[int], rank_files: dict[int, Path]) -> None:
    """The distinct slices must tile the tensor: no element twice, none missing."""
    boxes = list(f.pieces)
    seen: set[tuple[int, ...]] = set()
    for cell in _cells(boxes, f.shape):
        if cell in seen:
            raise SourceError(f"tensor {name!r}: two different slices overlap (found in {f.first}); the strategy "
                              "file does not describe these rank files.")
        seen.add(cell)
    total = sum(math.prod(e - b for b, e in box) for box in boxes)
    if total != math.prod(f.shape):
        lacking = [r for r in ranks_of_stage if r not in set(f.ranks)]
        who = (f"rank(s) {', '.join(f'rank_{r} ({rank_files[r].name})' for r in lacking[:6])} lack it"
               if lacking else "no rank lacks it, so the strategy does not match the files")
        raise SourceError(f"tensor {name!r}: the rank files hold {total} of its {math.prod(f.shape)} elements "
                          f"{list(f.shape)} on stage {f.stage}; {who}. Copy the complete checkpoint of every "
                          "rank (and the strategy of the same run).")


def _check_ranks(load: Path, stages: dict[int, StageStrategy], devices: int) -> int:
    ranks = len(_rank_dirs(load))
    if sorted(stages) != list(range(len(stages))):
        raise SourceError(f"the strategy files describe pipeline stages {sorted(stages)}; stages "
                          f"0..{max(stages)} are needed. Pass every ckpt_strategy_rank_*.ckpt (--src-strategy DIR).")
    for st in stages.values():
        if _stage_devices(st) != devices:
            raise SourceError(f"{st.file}: stage {st.stage} spans {_stage_devices(st)} devices, stage 0 spans "
                              f"{devices}; the strategy files come from different runs.")
    if ranks != devices * len(stages):
        raise SourceError(f"--load-dir {load} has {ranks} rank_N directories, but the strategy describes "
                          f"{len(stages)} pipeline stage(s) x {devices} devices = {devices * len(stages)} ranks. "
                          "Pass the strategy of this checkpoint's run (all stages), or copy the missing ranks.")
    return ranks


def open_distributed(load: Path, root: Path | None, strategy: Path | None, suffix: str | None) -> SourceIndex:
    """Index a distributed checkpoint as the single logical checkpoint it stores."""
    try:
        return _open(load, root, strategy, suffix)
    except OSError as e:
        hint = "; check the permissions of the rank directories and files" if isinstance(e, PermissionError) else ""
        raise SourceError(f"--load-dir {load}: cannot be read: {e.strerror or e}"
                          f"{f' ({e.filename})' if e.filename else ''}{hint}.") from e


def _open(load: Path, root: Path | None, strategy: Path | None, suffix: str | None) -> SourceIndex:
    if strategy is not None:
        check_source_path(strategy, root, "--src-strategy")
    if not is_distributed(load):
        raise SourceError(f"--src-strategy was given but --load-dir {load} holds no rank_N/ directories; a "
                          "merged checkpoint needs no strategy.")
    stages = _stages(_strategy_files(load, strategy, root))
    devices = _stage_devices(stages[min(stages)])
    ranks = _check_ranks(load, stages, devices)
    scan = _scan(load, root, stages, devices, suffix)
    tensors: dict[str, TensorInfo] = {}
    for name, f in scan.found.items():
        stage_ranks = list(range(f.stage * devices, (f.stage + 1) * devices))
        check_coverage(name, f, [r for r in stage_ranks if r < ranks], scan.rank_files)
        pieces = tuple(f.pieces.values())
        nbytes = math.prod(f.shape) * DTYPE_SIZES[f.dtype]
        first = pieces[0]
        if len(pieces) == 1:  # replicated: an ordinary tensor of one rank file
            tensors[name] = TensorInfo(name, f.dtype, f.shape, first.file, first.offset, nbytes)
        else:
            tensors[name] = TensorInfo(name, f.dtype, f.shape, first.file, first.offset, nbytes, pieces)
    for name, info in scan.plain.items():
        tensors.setdefault(name, info)
    return SourceIndex(tuple(scan.files), dict(sorted(tensors.items())))
