"""Writing a fixture: safetensors files (one, or shards with model.safetensors.index.json), the YAML, and the
optimizer state MindFormers saves beside the weights.

Optimizer key spellings (MindFormers mindformers/core/optim/, read at the commits the index holds):
- `adam_m.<p>`, `adam_v.<p>`: MindSpore AdamWeightDecay-style moments, also written by Muon
  (muon.py `_initialize_adamw_moments`: name "adam_m" + "." + name; shape (1,) for Muon-updated params).
- `exp_avg.<p>`, `exp_avg_sq.<p>`, `max_exp_avg_sq.<p>`: adamw.py / fused_adamw.py
  (`parameters.clone(prefix="exp_avg")` etc.; FusedAdamW clones max_exp_avg_sq only with amsgrad),
  plus `global_step`.
- `muon_m.<p>`: muon.py `_initialize_muon_moments` ("muon_m" + "." + name; shape (1,) fp32 for params Muon
  does not update).
- `pma_weight_ema.<p>` / `pma_weight_sma.<p>`: pma_adamw.py and fused_pma_adamw.py
  (`clone_state(prefix=f"pma_weight_{fused_algo}")`, fused_algo "ema" or "sma").
- CAME (came.py `init_came_state`): `exp_avg.<p>` and, with an underscore and no dot,
  `exp_avg_sq_row_<p>`, `exp_avg_sq_col_<p>`, `exp_avg_insta_row_<p>`, `exp_avg_insta_col_<p>`,
  `exp_avg_sq_<p>`, plus `afactor_step`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]


def _like(t: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    return torch.full(shape if shape is not None else tuple(t.shape), 0.5, dtype=torch.float32)


def _step() -> torch.Tensor:
    return torch.tensor([7], dtype=torch.int32)


def _adam(w: Tensors) -> Tensors:
    out = {f"{m}.{k}": _like(t) for k, t in w.items() for m in ("adam_m", "adam_v")}
    return {**out, "global_step": _step()}


def _fused_adamw(w: Tensors) -> Tensors:
    out = {f"{m}.{k}": _like(t) for k, t in w.items() for m in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    return {**out, "global_step": _step()}


def _muon(w: Tensors) -> Tensors:
    out: Tensors = {"global_step": _step()}
    for k, t in w.items():
        muon = t.dim() == 2 and "embedding" not in k and "output_layer" not in k
        out[f"muon_m.{k}"] = _like(t) if muon else _like(t, (1,))
        for m in ("adam_m", "adam_v"):
            out[f"{m}.{k}"] = _like(t, (1,)) if muon else _like(t)
    return out


def _pma(w: Tensors) -> Tensors:
    return {**_fused_adamw(w), **{f"pma_weight_{a}.{k}": _like(t) for k, t in w.items() for a in ("ema", "sma")}}


def _came(w: Tensors) -> Tensors:
    out: Tensors = {"global_step": _step(), "afactor_step": torch.zeros(1)}
    for k, t in w.items():
        s = tuple(t.shape)
        row, col, full = (s[:-1], s[:-2] + s[-1:], (1,)) if len(s) > 1 else ((1,), (1,), s)
        out[f"exp_avg.{k}"] = _like(t)
        for name, shape in (("sq_row", row), ("sq_col", col), ("insta_row", row), ("insta_col", col),
                            ("sq", full)):
            out[f"exp_avg_{name}_{k}"] = _like(t, shape)
    return out


OPTIMIZERS: dict[str, Callable[[Tensors], Tensors]] = {
    "adamw-moments": _adam, "fused-adamw-amsgrad": _fused_adamw, "muon": _muon, "pma-adamw": _pma,
    "came": _came,
}


def optimizer_state(kind: str, weights: Tensors) -> Tensors:
    return OPTIMIZERS[kind](weights)


def save_single(directory: Path, name: str, tensors: Tensors) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name))


def save_sharded(directory: Path, tensors: Tensors, shards: int) -> None:
    """HF-style shards `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    weight_map: dict[str, str] = {}
    size = 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(directory / name))
        weight_map.update(dict.fromkeys(part, name))
        size += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def run_sections(model_name: str, model_parallel: int) -> dict[str, Any]:
    """The non-model sections every MindFormers run YAML has (trimmed to the ones a converter might read)."""
    return {
        "seed": 42, "output_dir": "./output", "load_checkpoint": "", "run_mode": "finetune",
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": model_name},
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.0},
        "parallel_config": {"data_parallel": 1, "model_parallel": model_parallel, "pipeline_stage": 1,
                            "micro_batch_num": 1, "use_seq_parallel": False, "vocab_emb_dp": False},
    }
