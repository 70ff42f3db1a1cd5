"""`--ckpt-format torch_dist` without Megatron (issue 12 item 1): layout, round trip, verification, manifest.

The truth for every tensor is the `torch`-format conversion of the same source at TP1/PP1 (itself checked
against an independent reference by test_megatron_consumer), read back with plain `torch.load`; the
torch_dist checkpoint is read back with plain `torch.distributed.checkpoint.load` (no process group, no
Megatron) into tensors of the global shapes its `.metadata` declares, and must equal it bit for bit once
the per-layer tensors are stacked and named as Megatron's sharded keys.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from ms2mg_converter.demo.sample import SampleSpec
from tests.converter.conftest import run_cli, sample_flags

CONFIG_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
               "common_backend": "torch", "common_backend_version": 1}
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
            "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias"}
SPECS = {
    "gqa-swiglu": SampleSpec(),
    "qk-norm-bias-tied": SampleSpec(qk_layernorm=True, bias="all", tied=True, kv_channels=16),
    "layernorm-learned-gelu": SampleSpec(normalization="LayerNorm", swiglu=False, bias="all",
                                         position_embedding_type="learned_absolute"),
}


def _flags(spec: SampleSpec, *extra: str) -> list[str]:
    flags = [*sample_flags(spec), "--dtype", "fp32", "--normalization", spec.normalization,
             "--position-embedding-type", spec.position_embedding_type, *extra]
    if spec.position_embedding_type == "learned_absolute":
        flags += ["--max-position-embeddings", str(spec.max_position_embeddings)]
    return flags


def read_dcp(iter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor (global shape) and byte entry (unpickled) of a DCP checkpoint, with plain torch."""
    meta = dcp.FileSystemReader(str(iter_dir)).read_metadata()
    state: dict[str, Any] = {}
    for key, md in meta.state_dict_metadata.items():
        state[key] = io.BytesIO() if isinstance(md, BytesStorageMetadata) else torch.empty(
            md.size, dtype=md.properties.dtype)
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(iter_dir)),
             planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    # DCP's planner replaces each BytesIO placeholder with what torch.load made of the stored bytes
    objects = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert not any(isinstance(v, io.BytesIO) for v in objects.values()), "a byte entry was not read"
    return tensors, objects


def torch_format_global(root: Path) -> dict[str, torch.Tensor]:
    """A TP1/PP1 torch-format checkpoint's tensors, stacked and named as torch_dist's sharded keys."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    sd = torch.load(root / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["model"]
    layers: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        m = re.match(r"decoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            out[key] = value
            continue
        name = TE_NAMES.get(m.group(2), m.group(2))
        layers.setdefault(f"decoder.layers.{name}", {})[int(m.group(1))] = value
    for key, per_layer in layers.items():
        out[key] = torch.stack([per_layer[i] for i in sorted(per_layer)])
    if "output_layer.weight" in out and not torch.load(  # tied: the torch format holds no copy at PP1
            root / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt",
            weights_only=True)["args"].untie_embeddings_and_output_weights:
        del out["output_layer.weight"]
    return out


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("tp_pp", [("1", "1"), ("2", "2")])
def test_round_trip_equals_torch_format(make_sample: Callable[..., Any], convert: Callable[..., int],
                                        tmp_path: Path, name: str, tp_pp: tuple[str, str]) -> None:
    src, spec, _ = make_sample(**vars(SPECS[name]))
    dist, legacy = tmp_path / "dist", tmp_path / "torch"
    assert convert(src, dist, *_flags(spec, "--ckpt-format", "torch_dist", "--tp", tp_pp[0], "--pp", tp_pp[1])) == 0
    assert convert(src, legacy, *_flags(spec)) == 0
    tensors, objects = read_dcp(dist / "iter_0000001")
    truth = torch_format_global(legacy)
    assert sorted(tensors) == sorted(truth)
    for key, value in truth.items():
        assert tensors[key].dtype == value.dtype, key
        assert torch.equal(tensors[key], value), key
    assert objects and all(v == [None] for v in objects.values())
    layers = spec.num_layers
    extra = [k for k in objects if k.startswith("decoder.layers.")]
    per_layer = 7 if spec.qk_layernorm else 5
    assert sorted(extra) == sorted(f"{base}/shard_{i}_{layers}" for base in {k.split("/")[0] for k in extra}
                                   for i in range(layers))
    assert len(extra) == per_layer * layers
    assert "decoder.final_layernorm._extra_state/shard_0_1" in objects
    assert not any(k.startswith("output_layer._extra_state") for k in objects)


def test_layout_files_and_common(make_sample: Callable[..., Any], convert: Callable[..., int],
                                 tmp_path: Path) -> None:
    src, spec, _ = make_sample()
    dst = tmp_path / "out"
    assert convert(src, dst, *_flags(spec, "--ckpt-format", "torch_dist", "--tp", "2", "--pp", "2")) == 0
    it = dst / "iter_0000001"
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in it.iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    assert json.loads((it / "metadata.json").read_text()) == CONFIG_JSON
    torch.serialization.add_safe_globals([argparse.Namespace])
    common = torch.load(it / "common.pt", weights_only=True)
    assert common["checkpoint_version"] == 3.0
    assert common["iteration"] == 1
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    args = common["args"]
    assert (args.ckpt_format, args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == \
        ("torch_dist", 2, 2)
    assert args.no_save_optim and args.no_save_rng
    assert args.params_dtype == torch.float32
    meta = dcp.FileSystemReader(str(it)).read_metadata()
    qkv = meta.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"]
    assert qkv.size[0] == spec.num_layers
    assert [c.offsets[0] for c in qkv.chunks] == list(range(spec.num_layers))
    assert all(c.sizes[0] == 1 for c in qkv.chunks)
    manifest = json.loads((dst / "ms2mg-manifest.json").read_text())
    assert manifest["config"]["ckpt_format"] == "torch_dist"
    assert manifest["megatron_args"]["ckpt_format"] == "torch_dist"
    assert [f["path"] for f in manifest["files"]] == ["iter_0000001/__0_0.distcp"]
    assert manifest["verified"] is True


def test_verify_accepts_and_catches_corruption(make_sample: Callable[..., Any], convert: Callable[..., int],
                                               tmp_path: Path) -> None:
    src, spec, _ = make_sample()
    dst = tmp_path / "out"
    assert convert(src, dst, *sample_flags(spec), "--ckpt-format", "torch_dist") == 0  # bf16 (default)
    ok = run_cli("verify", "--load-dir", str(src), "--save-dir", str(dst))
    assert ok.returncode == 0, ok.stderr
    assert "OK: 1 file(s)" in ok.stdout
    data = dst / "iter_0000001" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    bad = run_cli("verify", "--load-dir", str(src), "--save-dir", str(dst))
    assert bad.returncode != 0
    assert "sha256 differs from the manifest" in bad.stdout
    (dst / "iter_0000001" / "metadata.json").write_text(json.dumps({**CONFIG_JSON, "extra": 1}))
    bad = run_cli("verify", "--load-dir", str(src), "--save-dir", str(dst))
    assert "metadata.json: missing, or not exactly" in bad.stdout


def test_verify_refuses_a_foreign_global_in_metadata(make_sample: Callable[..., Any], convert: Callable[..., int],
                                                     tmp_path: Path) -> None:
    src, spec, _ = make_sample()
    dst = tmp_path / "out"
    assert convert(src, dst, *sample_flags(spec), "--ckpt-format", "torch_dist", "--no-verify") == 0
    (dst / "iter_0000001" / ".metadata").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    bad = run_cli("verify", "--load-dir", str(src), "--save-dir", str(dst))
    assert bad.returncode != 0
    assert "refusing to load global os.system" in bad.stdout


def test_rerun_finds_the_same_conversion(make_sample: Callable[..., Any], tmp_path: Path) -> None:
    src, spec, _ = make_sample()
    dst = tmp_path / "out"
    flags = ["convert", "--load-dir", str(src), "--save-dir", str(dst), *sample_flags(spec), "--ckpt-format",
             "torch_dist", "--progress", "none"]
    assert run_cli(*flags).returncode == 0
    again = run_cli(*flags)
    assert again.returncode == 0, again.stderr
    assert "already holds this exact conversion" in again.stderr
