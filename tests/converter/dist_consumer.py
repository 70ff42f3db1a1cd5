"""megatron-core 0.16.1 loading a `torch_dist` checkpoint, on CPU, in one process (torch-dist-format.md §7, §10).

* `open_dist(root)`: the tracker, the iteration directory and `common.pt`'s args (Megatron reads them the same
  way: `metadata.json` marks the directory as torch_dist, `common.pt` holds the args).
* `with_layout(args, tp, pp, **pipeline)`: the same args for another TP/PP/uneven/virtual layout, as a
  training run started with other flags would have them (torch_dist has no TP/PP of its own).
* `load_dist_rank(ckpt, args, t, p, v)`: at TP1/PP1 (a world of one holds only the whole model), in this process:
  the GPTModel chunk of (0, p, v) built with size-only process groups (approach C of the consumer doc), its
  `sharded_state_dict()` filled by `dist_checkpointing.load` (DCP reads the per-layer chunks it needs), then
  `load_state_dict(strict=True)`. Access integrity (an all-gather of every rank's requests) is off: the
  other ranks are not there.
* `compare_multiprocess(ckpt, args, torch_root)`: any TP, with tp·pp real gloo processes (approach D, as
  torch-dist-format.md §10 ran it): every rank loads with `validate_access_integrity=True` and compares
  its loaded state dict with the rank file a `torch`-format conversion wrote for the same layout. One
  process cannot load a TP>1 rank: megatron-core describes the other ranks' shards as placed on
  `(rank + 1) % world_size`, which is the process itself in a world of one, and torch then refuses them.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

if __package__:
    from . import megatron_consumer as mc
else:
    import megatron_consumer as mc


@dataclasses.dataclass(frozen=True)
class DistCheckpoint:
    root: Path
    iter_dir: Path
    args: argparse.Namespace


def open_dist(root: Path) -> DistCheckpoint:
    tracker = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    assert tracker.isdigit() and int(tracker) > 0, f"tracker holds {tracker!r}"
    iter_dir = root / f"iter_{int(tracker):07d}"
    assert (iter_dir / "metadata.json").is_file(), "no metadata.json: Megatron would not take it for torch_dist"
    torch.serialization.add_safe_globals([argparse.Namespace])
    common = torch.load(iter_dir / "common.pt", map_location="cpu", weights_only=True)
    assert common["checkpoint_version"] == 3.0
    assert common["iteration"] == int(tracker)
    assert common["args"].ckpt_format == "torch_dist"
    return DistCheckpoint(root, iter_dir, common["args"])


_PIPELINE = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
             "num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank")


def with_layout(args: argparse.Namespace, tp: int, pp: int, **pipeline: int) -> argparse.Namespace:
    """`args` for a run with other parallel flags (the virtual size derived as Megatron-LM does)."""
    new = argparse.Namespace(**vars(args))
    new.tensor_model_parallel_size, new.pipeline_model_parallel_size = tp, pp
    for name in _PIPELINE:
        setattr(new, name, pipeline.get(name))
    per, chunks = pipeline.get("num_layers_per_virtual_pipeline_stage"), pipeline.get(
        "num_virtual_stages_per_pipeline_rank")
    new.virtual_pipeline_model_parallel_size = chunks if per is None else args.num_layers // pp // per
    return new


def chunks_of(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """Every (t, p, v) of a layout."""
    vp = mc.virtual_size(args) or 1
    return [(t, p, v) for p in range(args.pipeline_model_parallel_size)
            for t in range(args.tensor_model_parallel_size) for v in range(vp)]


def load_dist_rank(ckpt: DistCheckpoint, args: argparse.Namespace, t: int, p: int, v: int = 0) -> Any:
    from megatron.core import dist_checkpointing

    model = mc.build_rank_model(args, t, p, v)
    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load({"model": sharded}, str(ckpt.iter_dir),
                                     validate_access_integrity=False)["model"]
    where = f"{ckpt.iter_dir} as TP{args.tensor_model_parallel_size}/PP{args.pipeline_model_parallel_size} " \
            f"rank ({t}, {p}, {v})"
    mc._strict_load(model, loaded, where)
    return model


def state_of(model: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def dist_logits(ckpt: DistCheckpoint, args: argparse.Namespace, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the checkpoint loaded as TP1 and `args`' pipeline layout, chunks chained in this process."""
    assert args.tensor_model_parallel_size == 1
    vp = mc.virtual_size(args) or 1
    models = {(p, v): load_dist_rank(ckpt, args, 0, p, v).eval()
              for p in range(args.pipeline_model_parallel_size) for v in range(vp)}
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    hidden: torch.Tensor | None = None
    for v in range(vp):
        for p in range(args.pipeline_model_parallel_size):
            model = models[(p, v)]
            if hidden is None:
                hidden = model(input_ids=input_ids, position_ids=positions, attention_mask=None)
            else:
                model.set_input_tensor(hidden)
                hidden = model(input_ids=None, position_ids=positions, attention_mask=None)
    assert hidden is not None
    return hidden.float()


def compare_rank(model: Any, torch_sd: dict[str, Any], where: str) -> list[str]:
    """Differences between a loaded model chunk and the state dict of a torch-format rank file."""
    got = state_of(model)
    want = {k: v for k, v in torch_sd.items() if isinstance(v, torch.Tensor)}
    if got.keys() != want.keys():
        return [f"{where}: tensor keys differ: {sorted(got.keys() ^ want.keys())}"]
    return [f"{where}: {k} differs" for k in got if not torch.equal(got[k], want[k])]


def _rank_problems(ckpt_dir: str, args: argparse.Namespace, torch_root: str) -> list[str]:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    tck = mc.open_checkpoint(Path(torch_root))
    torch_sd = tck.load_rank(t, p)
    config, kwargs = mc.model_setup(args, mc.params_dtype(args))
    models = {}
    for v, key in enumerate(tck.chunk_keys):
        groups = ProcessGroupCollection.use_mpu_process_groups()
        groups.embd = None
        models[key] = GPTModel(config, pg_collection=groups, **mc.chunk_roles(args, p, v), **kwargs)
    # every chunk of the rank in one load, as Megatron-LM does (access integrity spans all of them)
    loaded = dist_checkpointing.load({key: m.sharded_state_dict() for key, m in models.items()}, ckpt_dir,
                                     validate_access_integrity=True)
    problems = []
    for v, (key, model) in enumerate(models.items()):
        where = f"rank ({t}, {p}, {v})"
        mc._strict_load(model, loaded[key], where)
        problems += compare_rank(model, torch_sd[key], where)
    return problems


def _worker(rank: int, world: int, store: str, jobs: list[tuple[str, str, argparse.Namespace]], out: str) -> None:
    import datetime
    import traceback
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    mc.install_cpu_patches()
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    args = jobs[0][2]
    ps.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                 virtual_pipeline_model_parallel_size=mc.virtual_size(args))
    problems = []
    for ckpt_dir, torch_root, job_args in jobs:
        try:
            problems += [f"{ckpt_dir}: {p}" for p in _rank_problems(ckpt_dir, job_args, torch_root)]
        except Exception:  # noqa: BLE001 - reported to the test
            problems.append(f"{ckpt_dir}: rank {rank}: {traceback.format_exc()}")
        Path(f"{out}.{rank}").write_text("\n".join(problems))  # kept when another rank hangs
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def compare_multiprocess(jobs: list[tuple[DistCheckpoint, Path, argparse.Namespace]],
                         timeout_s: float = 300.0) -> list[str]:
    """Load each torch_dist checkpoint as its `args`' layout (one TP/PP/VP for all) in tp·pp gloo processes,
    started once, and compare every rank with the torch-format conversion given with it; the problems found
    (empty: all equal)."""
    import tempfile
    import time

    import torch.multiprocessing as mp

    sizes = {(a.tensor_model_parallel_size, a.pipeline_model_parallel_size, mc.virtual_size(a)) for *_, a in jobs}
    assert len(sizes) == 1, f"one parallel layout per batch, got {sizes}"
    args = jobs[0][2]
    world = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    with tempfile.TemporaryDirectory(prefix="ms2mg-dist-") as tmp:
        out = f"{tmp}/problems"
        work = [(str(ck.iter_dir), str(root), a) for ck, root, a in jobs]
        ctx = mp.start_processes(_worker, args=(world, f"{tmp}/store", work, out), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gloo workers did not finish within {timeout_s} s")
        except Exception as e:
            found = [Path(f"{out}.{r}").read_text() for r in range(world) if Path(f"{out}.{r}").is_file()]
            raise AssertionError("a gloo worker failed; what the ranks reported:\n" + "\n".join(found)) from e
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        return [line for r in range(world) for line in Path(f"{out}.{r}").read_text().splitlines()]
