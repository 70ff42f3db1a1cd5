"""Test helper: re-merge a written Megatron checkpoint and undo every layout step, with torch only.

`merge_checkpoint` reads all rank files with `torch.load(weights_only=True)`, renumbers pipeline-local
layers to global ones (megatron-core's own placement, uneven stages and virtual chunks included), maps
TransformerEngine key names back, and merges tensor-parallel shards with Megatron's rules (`Split.merge`).
`back_to_source` then applies the inverse layout operations so the result can be compared, bit for bit,
with the source tensors cast to the output dtype.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ms2mg_converter.config import Fc1Layout, QkvLayout
from ms2mg_converter.layout import GluFused, QkvFused, Split
from tests.converter.megatron_consumer import layer_placement

TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
            "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
            "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
            "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight"}
MLA_COLUMN = ("linear_q_proj.weight", "linear_q_up_proj.weight", "linear_kv_up_proj.weight")
MLA_DOWN = ("linear_q_down_proj.weight", "linear_kv_down_proj.weight")


def split_kind(name: str, te: bool = False) -> str:
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "vocab"
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", *MLA_COLUMN)):
        return "column"
    if name.endswith(MLA_DOWN):  # MLA down projections: ColumnParallelLinear (local), TELinear duplicated (TE)
        return "replicated" if te else "column"
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return "glu"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    return "replicated"


def load_rank_files(root: Path) -> tuple[dict[tuple[int, int], dict[str, Any]], argparse.Namespace]:
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
    files: dict[tuple[int, int], dict[str, Any]] = {}
    args = None
    for path in sorted((root / "iter_0000001").glob("mp_rank_*/model_optim_rng.pt")):
        m = re.fullmatch(r"mp_rank_(\d\d)(?:_(\d\d\d))?", path.parent.name)
        assert m, path
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(path, weights_only=True)
        assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 1
        files[(int(m.group(1)), int(m.group(2) or 0))] = sd
        args = sd["args"]
    assert args is not None, f"no rank files under {root}"
    return files, args


def _canonical(key: str, first_layer: int) -> str:
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
    if not m:
        return key
    rest = TE_NAMES.get(m.group(2), m.group(2))
    return f"decoder.layers.{first_layer + int(m.group(1))}.{rest}"


def _state_dicts(sd: dict[str, Any], p: int, args: argparse.Namespace,
                 placement: dict[tuple[int, int], range]) -> list[tuple[range, dict[str, Any]]]:
    """(global layers, state dict) of each model chunk of rank file (·, p): `model`, or `model0`, ... ."""
    chunks = 1 + max(v for _, v in placement)
    keys = ["model"] if chunks == 1 else [f"model{v}" for v in range(chunks)]
    assert sorted(k for k in sd if k.startswith("model")) == sorted(keys), (p, sorted(sd))
    out = []
    for v, key in enumerate(keys):
        layers = placement[(p, v)]
        local = {int(k.split(".")[2]) for k in sd[key] if k.startswith("decoder.layers.")}
        assert local == set(range(len(layers))), (p, key, sorted(local), layers)
        pre, post = p == 0 and v == 0, p == args.pipeline_model_parallel_size - 1 and v == chunks - 1
        assert ("embedding.word_embeddings.weight" in sd[key]) == pre, (p, key)
        assert ("decoder.final_layernorm.weight" in sd[key]) == post, (p, key)
        out.append((layers, sd[key]))
    return out


def merge_checkpoint(root: Path) -> tuple[dict[str, torch.Tensor], argparse.Namespace]:
    """Full (TP1/PP1) Megatron tensors by canonical name; `_extra_state` entries are checked to be None.

    Pipeline-local layer numbers become global ones with megatron-core's own placement (`layer_placement`:
    uneven stages, virtual chunks), not the converter's."""
    files, args = load_rank_files(root)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    assert set(files) == {(t, p) for t in range(tp) for p in range(pp)}
    placement = layer_placement(args)
    shards: dict[str, list[torch.Tensor]] = defaultdict(list)
    for (_t, p), sd in sorted(files.items()):
        for layers, model in _state_dicts(sd, p, args, placement):
            for key, value in model.items():
                if key.endswith("_extra_state"):
                    assert value is None, key
                    continue
                name = _canonical(key, layers.start)
                if name == "output_layer.weight" and not args.untie_embeddings_and_output_weights:
                    name = "tied-output-copy"
                shards[name].append(value)
    te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    merged = {n: Split(split_kind(n, te) if n != "tied-output-copy" else "vocab").merge(s, args.swiglu)
              for n, s in shards.items()}
    if "tied-output-copy" in merged:
        assert torch.equal(merged.pop("tied-output-copy"), merged["embedding.word_embeddings.weight"])
    return merged, args


def back_to_source(merged: dict[str, torch.Tensor], args: argparse.Namespace, qkv_layout: QkvLayout,
                   fc1_layout: Fc1Layout, source_vocab_rows: int) -> dict[str, torch.Tensor]:
    """Undo the layout steps: Megatron-layout tensors -> MindFormers mcore-layout tensors."""
    nh, ng, d = args.num_attention_heads, args.num_query_groups, args.kv_channels
    out = {}
    for name, t in merged.items():
        if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            (t,) = QkvFused(nh, ng, d, qkv_layout).invert(t)
        elif name.endswith(("linear_fc1.weight", "linear_fc1.bias")) and args.swiglu:
            (t,) = GluFused(t.shape[0] // 2, fc1_layout).invert(t)
        elif name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[: min(source_vocab_rows, t.shape[0])]
        out[name] = t
    return out
