"""megatron-core 0.16.1 as a real consumer of converted checkpoints, on CPU (see
shared/docs/megatron-core-as-test-consumer.md).

* `open_checkpoint(dir)` reads the on-disk layout of target-format.md §5: the tracker file, then every
  `iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`, loaded with `torch.load(weights_only=True)` after
  allow-listing `argparse.Namespace`.
* `model_setup(args, ...)` builds the `TransformerConfig` and `GPTModel` arguments from the checkpoint's own
  `args` only, so a field the converter forgot makes the model wrong and the test fail.
* `load_all_ranks_strict(ckpt)` (approach C): one process, fake size/rank-only process groups; every state
  dict of every rank file (`model`, or `model0`, `model1`, ... with virtual pipeline chunks) goes into the
  GPTModel of its (tp, pp, virtual stage) with `load_state_dict(strict=True)`.
* `layer_placement(args)`: which global layers megatron-core itself puts in each (pp rank, virtual stage),
  from its own `get_transformer_layer_offset` / `get_num_layers_to_build`.
* `logits_in_process(ckpt, ids)`: TP=1, any PP and virtual stages, chunks chained in one process.
* `logits_multiprocess(ckpts, ids)` (approach D): tp·pp real gloo processes (`initialize_model_parallel`),
  send/recv between stages (and from the last stage back to the first between virtual stages),
  vocab-parallel logits all-gathered; results come back through files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


# ---------------------------------------------------------------------------------------------- on disk

@dataclasses.dataclass(frozen=True)
class Checkpoint:
    root: Path
    iteration: int
    tp: int
    pp: int
    args: argparse.Namespace

    @property
    def vp(self) -> int:
        """Model chunks per rank file (virtual pipeline stages; 1 without)."""
        return virtual_size(self.args) or 1

    @property
    def chunk_keys(self) -> list[str]:
        """The state dict keys of every rank file, as Megatron-LM's checkpointing writes them."""
        return ["model"] if self.vp == 1 else [f"model{v}" for v in range(self.vp)]

    def rank_path(self, t: int, p: int) -> Path:
        name = f"mp_rank_{t:02d}" if self.pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
        return self.root / f"iter_{self.iteration:07d}" / name / "model_optim_rng.pt"

    def load_rank(self, t: int, p: int) -> dict[str, Any]:
        return load_rank_file(self.rank_path(t, p))


def load_rank_file(path: Path) -> dict[str, Any]:
    torch.serialization.add_safe_globals([argparse.Namespace])
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(sd, dict), f"{path}: not a dict"
    missing = {"args", "checkpoint_version", "iteration"} - set(sd)
    assert not missing, f"{path}: top-level keys {sorted(missing)} missing"
    assert "model" in sd or "model0" in sd, f"{path}: no model state dict ({sorted(sd)})"
    assert sd["checkpoint_version"] == 3.0, f"{path}: checkpoint_version {sd['checkpoint_version']}"
    assert isinstance(sd["args"], argparse.Namespace), f"{path}: args is {type(sd['args'])}"
    return sd


def open_checkpoint(root: Path) -> Checkpoint:
    """Read the tracker, find the full TP×PP grid of rank files, and return the rank-0 file's args."""
    tracker = (root / "latest_checkpointed_iteration.txt").read_text(encoding="utf-8").strip()
    assert tracker.isdigit(), f"tracker holds {tracker!r}"
    assert int(tracker) > 0, f"tracker holds {tracker!r}"
    iteration = int(tracker)
    it_dir = root / f"iter_{iteration:07d}"
    ranks = []
    for entry in sorted(it_dir.iterdir()):
        m = _RANK_DIR.match(entry.name)
        assert m, f"unexpected entry {entry} in {it_dir}"
        ranks.append((int(m.group(1)), int(m.group(2)) if m.group(2) is not None else None))
    tp = 1 + max(t for t, _ in ranks)
    pp_ranks = {p for _, p in ranks}
    pp = 1 if pp_ranks == {None} else 1 + max(p for p in pp_ranks if p is not None)
    expected = {(t, None if pp == 1 else p) for t in range(tp) for p in range(pp)}
    assert set(ranks) == expected, f"rank dirs {sorted(ranks, key=str)} are not a full {tp}x{pp} grid"
    first = load_rank_file(Checkpoint(root, iteration, tp, pp, argparse.Namespace()).rank_path(0, 0))
    assert first["iteration"] == iteration, f"iteration {first['iteration']} != tracker {iteration}"
    args = first["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp), \
        f"args say TP{args.tensor_model_parallel_size}/PP{args.pipeline_model_parallel_size}, " \
        f"rank dirs TP{tp}/PP{pp}"
    ckpt = Checkpoint(root, iteration, tp, pp, args)
    models = sorted(k for k in first if k.startswith("model"))
    assert models == sorted(ckpt.chunk_keys), f"rank (0, 0) holds {models}, args say {ckpt.chunk_keys}"
    return ckpt


def virtual_size(args: argparse.Namespace) -> int | None:
    """`virtual_pipeline_model_parallel_size` as Megatron-LM's `validate_args` derives it from the flags stored
    in `args` (core_r0.12.0), checked against the stored value."""
    per_chunk = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    chunks = getattr(args, "num_virtual_stages_per_pipeline_rank", None)
    assert per_chunk is None or chunks is None, "both virtual pipeline flags are set"
    derived = chunks
    if per_chunk is not None:
        derived = args.num_layers // args.pipeline_model_parallel_size // per_chunk
    stored = getattr(args, "virtual_pipeline_model_parallel_size", None)
    assert stored == derived, f"virtual_pipeline_model_parallel_size {stored}, the flags give {derived}"
    return derived


# ---------------------------------------------------------------------------------------- model set-up

_REQUIRED_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "swiglu", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
    "normalization", "position_embedding_type", "untie_embeddings_and_output_weights", "padded_vocab_size",
    "max_position_embeddings", "tensor_model_parallel_size", "pipeline_model_parallel_size", "fp16", "bf16",
)


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def install_cpu_patches() -> None:
    """The three CPU monkeypatches megatron-core needs for a forward pass (consumer doc §3)."""
    import megatron.core.fusions.fused_softmax as fused_softmax
    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    fused_softmax.get_default_causal_mask = lambda n: torch.ones(n, n, dtype=torch.bool).triu(1)
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def ensure_single_process_state() -> None:
    """Approach A: a world of 1 (no port) and model parallel state 1×1, needed before approach C."""
    from megatron.core import parallel_state as ps

    install_cpu_patches()
    if not torch.distributed.is_initialized():
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)


def model_setup(args: argparse.Namespace, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """`TransformerConfig` and the GPTModel keyword arguments for the checkpoint `args`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    missing = [k for k in _REQUIRED_ARGS if getattr(args, k, None) is None and k != "num_query_groups"]
    assert not missing, f"checkpoint args lack {missing}"
    if getattr(args, "multi_latent_attention", False):
        from tests.converter.mla_consumer import mla_model_setup

        return mla_model_setup(args, dtype, virtual_size(args))
    assert not getattr(args, "rotary_interleaved", False), "rotary_interleaved is not what MindFormers uses"
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        # megatron.training.arguments.core_transformer_config_from_args: groups only with GQA on
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias, qk_layernorm=args.qk_layernorm,
        normalization=args.normalization, layernorm_epsilon=getattr(args, "norm_epsilon", 1e-5),
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        # megatron.training.arguments.core_transformer_config_from_args: the uneven-stage flags and the virtual size
        virtual_pipeline_model_parallel_size=virtual_size(args),
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False, attention_dropout=0.0, hidden_dropout=0.0,
    )
    kwargs = {
        "transformer_layer_spec": get_gpt_layer_local_spec(normalization=args.normalization,
                                                           qk_layernorm=args.qk_layernorm),
        "vocab_size": args.padded_vocab_size,
        "max_sequence_length": args.max_position_embeddings,
        "position_embedding_type": args.position_embedding_type,
        "rotary_base": getattr(args, "rotary_base", 10000),
        "rotary_percent": getattr(args, "rotary_percent", 1.0),
        "share_embeddings_and_output_weights": not args.untie_embeddings_and_output_weights,
    }
    return config, kwargs


class SizeOnlyGroup:
    """What GPTModel asks a process group while building: size() and rank()."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def with_te_extra_state(module: torch.nn.Module) -> None:
    """Give `module` the `_extra_state` of a TransformerEngine module, in place.

    With TransformerEngine installed, Megatron builds the final norm (and, with the TE spec, the core
    attention) as TE modules, whose state dict holds `<name>._extra_state` and which accept None there
    (TE `TransformerEngineBaseModule.set_extra_state` returns on None; get_extra_state gives a serialized
    FP8 meta, None-equivalent without FP8). TE has no CPU build, so this stand-in adds exactly that to the
    local module (its class gains get/set_extra_state, which is how torch decides a module has extra state);
    it refuses any other value than None, the only one a conversion may write."""
    base = type(module)

    def get_extra_state(self: torch.nn.Module) -> None:
        return None

    def set_extra_state(self: torch.nn.Module, state: Any) -> None:
        assert state is None, f"{base.__name__}: unexpected _extra_state {type(state)}"

    module.__class__ = type(f"TeExtraState{base.__name__}", (base,),
                            {"get_extra_state": get_extra_state, "set_extra_state": set_extra_state})


def te_like(model: Any, spec: str) -> Any:
    """Make a local-spec GPTModel load what a TransformerEngine build of Megatron writes or reads.

    `final-norm`: the final norm carries TE's `_extra_state` (Megatron's default when TE is installed).
    `te-names`: also the TE layer-spec names (`linear_qkv.layer_norm_weight`, ...), mapped onto the local
    modules by megatron-core's own pre-hook `mcore_gpt_load_te_state_dict_pre_hook` (used by its ModelOpt
    path to load TE-spec checkpoints into local linears), and the core attention's TE `_extra_state`."""
    from megatron.core.post_training.modelopt.gpt.state_dict_hooks import mcore_gpt_load_te_state_dict_pre_hook

    if getattr(model, "post_process", False):
        with_te_extra_state(model.decoder.final_layernorm)
    if spec == "te-names":
        for layer in model.decoder.layers:
            with_te_extra_state(layer.self_attention.core_attention)
        model._register_load_state_dict_pre_hook(mcore_gpt_load_te_state_dict_pre_hook)
    return model


def chunk_roles(args: argparse.Namespace, p: int, v: int) -> dict[str, Any]:
    """GPTModel's pre_process / post_process / vp_stage for chunk v of pipeline rank p, as Megatron-LM's
    `get_model` chooses them (`mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v)`)."""
    pp, vp = args.pipeline_model_parallel_size, virtual_size(args)
    last_v = (vp or 1) - 1
    return {"pre_process": p == 0 and v == 0, "post_process": p == pp - 1 and v == last_v,
            "vp_stage": v if vp is not None else None}


def build_rank_model(args: argparse.Namespace, t: int, p: int, v: int = 0, dtype: torch.dtype | None = None,
                     te: str | None = None) -> Any:
    """Approach C: the GPTModel of rank (t, p), virtual stage v, of the checkpoint's TP×PP, in this process
    (`te`: see `te_like`)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    ensure_single_process_state()
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    config, kwargs = model_setup(args, dtype or params_dtype(args))
    groups = ProcessGroupCollection(tp=SizeOnlyGroup(tp, t), pp=SizeOnlyGroup(pp, p), cp=SizeOnlyGroup(1, 0),
                                    embd=None, pos_embd=None)
    model = GPTModel(config, pg_collection=groups, **chunk_roles(args, p, v), **kwargs)
    return te_like(model, te) if te else model


def layer_placement(args: argparse.Namespace) -> dict[tuple[int, int], range]:
    """(pp rank, virtual stage) -> the global layers megatron-core builds there (its own functions)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config, _ = model_setup(args, params_dtype(args))
    vp = virtual_size(args)
    out = {}
    for p in range(args.pipeline_model_parallel_size):
        for v in range(vp or 1):
            stage = v if vp is not None else None
            start = get_transformer_layer_offset(config, stage, p) if args.pipeline_model_parallel_size > 1 else 0
            out[(p, v)] = range(start, start + get_num_layers_to_build(config, stage, p))
    return out


def _strict_load(model: Any, state: dict[str, Any], where: str) -> None:
    try:
        result = model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AssertionError(f"{where}: strict load failed: {e}") from e
    assert not result.missing_keys, f"{where}: {result}"
    assert not result.unexpected_keys, f"{where}: {result}"


def load_all_ranks_strict(ckpt: Checkpoint, te: str | None = None) -> dict[tuple[int, int, int], Any]:
    """Load every state dict of every rank file strictly into its chunk's GPTModel; check that the args of
    every file agree and that every file holds exactly the chunk keys the args call for (`te`: see `te_like`).

    Returns the loaded models by (t, p, v). Shapes are checked by the strict load (size mismatch raises).
    """
    models = {}
    dtype = params_dtype(ckpt.args)
    for p in range(ckpt.pp):
        for t in range(ckpt.tp):
            sd = ckpt.load_rank(t, p)
            where = str(ckpt.rank_path(t, p))
            assert vars(sd["args"]) == vars(ckpt.args), f"{where}: args differ from rank (0, 0)"
            stored = sorted(k for k in sd if k.startswith("model"))
            assert stored == sorted(ckpt.chunk_keys), f"{where}: holds {stored}, expected {ckpt.chunk_keys}"
            for v, key in enumerate(ckpt.chunk_keys):
                tensors = [x for x in sd[key].values() if isinstance(x, torch.Tensor)]
                assert tensors, f"{where} {key}: no tensors"
                assert all(x.dtype == dtype for x in tensors), f"{where} {key}: tensors are not all {dtype}"
                model = build_rank_model(ckpt.args, t, p, v, te=te)
                _strict_load(model, sd[key], f"{where} {key}")
                models[(t, p, v)] = model
    return models


def chunk_order(ckpt: Checkpoint) -> list[tuple[int, int]]:
    """(pp rank, virtual stage) in forward order: every stage's chunk v before any stage's chunk v + 1."""
    return [(p, v) for v in range(ckpt.vp) for p in range(ckpt.pp)]


@torch.no_grad()
def logits_in_process(ckpt: Checkpoint, input_ids: torch.Tensor, te: str | None = None) -> torch.Tensor:
    """Logits `[b, s, padded_vocab]` (fp32) of a TP=1 checkpoint, all chunks chained in this process."""
    assert ckpt.tp == 1, "a TP>1 forward needs real process groups: use logits_multiprocess"
    models = load_all_ranks_strict(ckpt, te)
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    hidden: torch.Tensor | None = None
    for p, v in chunk_order(ckpt):
        model = models[(0, p, v)].eval()
        if hidden is None:
            out = model(input_ids=input_ids, position_ids=positions, attention_mask=None)
        else:
            model.set_input_tensor(hidden)
            out = model(input_ids=None, position_ids=positions, attention_mask=None)
        hidden = out
    assert hidden is not None
    return hidden.float()


# ----------------------------------------------------------------------------------- approach D (gloo)

def _rank_chunks(ckpt: Checkpoint, t: int, p: int) -> list[Any]:
    """This process's chunk models (one per virtual stage), built on the real process groups, loaded strict."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    config, kwargs = model_setup(ckpt.args, params_dtype(ckpt.args))
    sd = ckpt.load_rank(t, p)
    models = []
    for v, key in enumerate(ckpt.chunk_keys):
        groups = ProcessGroupCollection.use_mpu_process_groups()
        groups.embd = None  # skip the tied-embedding all-reduce (it moves weights to CUDA); the load fills it
        model = GPTModel(config, pg_collection=groups, **chunk_roles(ckpt.args, p, v), **kwargs)
        _strict_load(model, sd[key], f"{ckpt.rank_path(t, p)} {key}")
        models.append(model.eval())
    return models


@torch.no_grad()
def _forward_chunks(ckpt: Checkpoint, t: int, p: int, ids: torch.Tensor, out_file: str) -> None:
    """Run this rank's chunks in pipeline order: receive from the previous stage (the last stage, between
    virtual stages), compute, send on; the last chunk of the last stage gathers the vocab-parallel logits."""
    from megatron.core import parallel_state as ps

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    hidden_shape = (ids.shape[1], ids.shape[0], ckpt.args.hidden_size)  # [s, b, h]
    order = chunk_order(ckpt)
    for v, model in enumerate(_rank_chunks(ckpt, t, p)):
        if (p, v) == order[0]:
            out = model(input_ids=ids, position_ids=positions, attention_mask=None)
        else:
            buf = torch.empty(hidden_shape, dtype=params_dtype(ckpt.args))
            torch.distributed.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
            out = model(input_ids=None, position_ids=positions, attention_mask=None)
        if (p, v) != order[-1]:
            torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            continue
        parts = [torch.empty_like(out) for _ in range(ckpt.tp)]
        torch.distributed.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        if t == 0:
            torch.save(torch.cat(parts, dim=-1).float(), out_file)


def _worker(rank: int, world: int, store_file: str, jobs: Sequence[tuple[str, str]],
            ids: torch.Tensor) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    install_cpu_patches()
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=120))
    first = open_checkpoint(Path(jobs[0][0]))
    tp, pp = first.tp, first.pp
    ps.initialize_model_parallel(tp, pp)
    t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    for ckpt_dir, out_file in jobs:
        ckpt = open_checkpoint(Path(ckpt_dir))
        assert (ckpt.tp, ckpt.pp) == (tp, pp), f"{ckpt_dir}: TP{ckpt.tp}/PP{ckpt.pp}, batch is TP{tp}/PP{pp}"
        _forward_chunks(ckpt, t, p, ids, out_file)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def logits_multiprocess(ckpt_dirs: Sequence[Path], input_ids: torch.Tensor,
                        timeout_s: float = 300.0) -> list[torch.Tensor]:
    """Logits `[b, s, padded_vocab]` (fp32) of each checkpoint, computed by tp·pp gloo processes.

    All checkpoints must share one TP×PP; the processes are started once and evaluate them in turn.
    """
    import torch.multiprocessing as mp

    assert ckpt_dirs
    first = open_checkpoint(Path(ckpt_dirs[0]))
    world = first.tp * first.pp
    with tempfile.TemporaryDirectory(prefix="ms2mg-gloo-") as tmp:
        outs = [os.path.join(tmp, f"logits-{i}.pt") for i in range(len(ckpt_dirs))]
        jobs = [(str(d), o) for d, o in zip(ckpt_dirs, outs, strict=True)]
        ctx = mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), jobs, input_ids),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gloo workers did not finish within {timeout_s} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        return [torch.load(o, weights_only=True) for o in outs]


def rank_shapes(ckpt: Checkpoint) -> Iterator[tuple[tuple[int, int], dict[str, tuple[int, ...]]]]:
    """(t, p) and the tensor shapes of that rank file, keyed `<state dict>/<key>` (for diagnostics)."""
    for p in range(ckpt.pp):
        for t in range(ckpt.tp):
            sd = ckpt.load_rank(t, p)
            yield (t, p), {f"{m}/{k}": tuple(v.shape) for m in ckpt.chunk_keys for k, v in sd[m].items()
                           if isinstance(v, torch.Tensor)}
