"""Round trip (every EP/TP rank merged back into MindFormers' grouped weight1/weight2, bit for bit), verification
of expert tensors (swapped experts are found), and the manifest and `inspect` for expert-parallel files."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.families.runner import convert, load_rank_files, read_json
from tests.moe.fixture import MoeDims, make_truth, write_mindformers


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ms2mg_converter", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def _merge_experts(ranks: dict[str, dict[str, object]], layer: int, tp: int, ep: int, per: int) -> tuple[
        torch.Tensor, torch.Tensor]:
    """[E, 2F, h] fc1 and [E, h, F] fc2 of all experts, from the rank files (TP merged: GLU halves, columns)."""
    fc1, fc2 = [], []
    for e in range(ep):
        for k in range(per):
            shards = [ranks[f"mp_rank_{r:02d}" + (f"_{e:03d}" if ep > 1 else "")]["model"] for r in range(tp)]
            p = f"decoder.layers.{layer}.mlp.experts.local_experts.{k}."
            halves = [s[p + "linear_fc1.weight"].chunk(2) for s in shards]  # type: ignore[index]
            fc1.append(torch.cat([h[0] for h in halves] + [h[1] for h in halves]))
            fc2.append(torch.cat([s[p + "linear_fc2.weight"] for s in shards], dim=1))  # type: ignore[index]
    return torch.stack(fc1), torch.stack(fc2)


@pytest.mark.parametrize(("version", "tp", "ep"), [("r1.7", 2, 2), ("r1.6", 1, 4)])
def test_experts_merge_back_to_the_source(tmp_path: Path, version: str, tp: int, ep: int) -> None:
    d = MoeDims(version=version)
    src, cfg = write_mindformers(tmp_path, d, make_truth(d))
    out = tmp_path / "out"
    run = convert("--load-dir", str(src), "--config", str(cfg), "--save-dir", str(out), "--dtype", "fp32",
                  "--tp", str(tp), "--ep", str(ep))
    assert run.returncode == 0, run.stderr
    ranks = load_rank_files(out)
    source = load_file(str(src / "model.safetensors"))
    for layer in range(d.dense, d.layers):
        fc1, fc2 = _merge_experts(ranks, layer, tp, ep, d.experts // ep)
        w1 = source[f"decoder.layers.{layer}.mlp.experts.weight1"]
        w2 = source[f"decoder.layers.{layer}.mlp.experts.weight2"]
        assert torch.equal(fc1.transpose(1, 2).reshape(w1.shape), w1)  # MindFormers: [E, h, 2F] flat
        assert torch.equal(fc2.transpose(1, 2).reshape(w2.shape), w2)  # [E, F, h] flat


def test_verify_finds_swapped_experts(tmp_path: Path) -> None:
    d = MoeDims()
    src, cfg = write_mindformers(tmp_path, d, make_truth(d))
    out = tmp_path / "out"
    flags = ["--config", str(cfg), "--ep", "2"]
    assert convert("--load-dir", str(src), "--save-dir", str(out), *flags).returncode == 0
    path = out / "iter_0000001/mp_rank_00_001/model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(path, weights_only=True)
    model = sd["model"]
    a, b = (f"decoder.layers.1.mlp.experts.local_experts.{k}.linear_fc1.weight" for k in (0, 1))
    model[a], model[b] = model[b], model[a]  # same shapes, other experts
    torch.save(sd, path)
    (out / "ms2mg-manifest.json").unlink()  # only the tensor comparison can tell now
    bad = _cli("verify", "--load-dir", str(src), "--save-dir", str(out), *flags)
    assert bad.returncode == 5, bad.stdout + bad.stderr
    assert "mp_rank_00_001" in bad.stdout and a in bad.stdout


def test_manifest_and_inspect_show_expert_ranks(tmp_path: Path) -> None:
    d = MoeDims()
    src, cfg = write_mindformers(tmp_path, d, make_truth(d))
    out = tmp_path / "out"
    flags = ["--config", str(cfg), "--ep", "2", "--tp", "2"]
    assert convert("--load-dir", str(src), "--save-dir", str(out), *flags).returncode == 0
    files = read_json(out / "ms2mg-manifest.json")["files"]
    ranks = {(f["tensor_parallel_rank"], f["expert_parallel_rank"]): f["path"] for f in files}
    assert ranks == {(t, e): f"iter_0000001/mp_rank_{t:02d}_{e:03d}/model_optim_rng.pt"
                     for t in range(2) for e in range(2)}
    text = _cli("inspect", "--load-dir", str(src), *flags)
    assert text.returncode == 0, text.stderr
    assert "TP 2 x PP 1 x EP 2" in text.stdout and "(tp 1, pp 0, ep 1," in text.stdout
    assert ("decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight: bf16 [32, 8]"
            in text.stdout.split("mp_rank_00_001")[1])
    plan = json.loads(_cli("inspect", "--load-dir", str(src), "--json", *flags).stdout)
    entry = next(e for e in plan["files"][3]["entries"]
                 if e["key"] == "decoder.layers.2.mlp.experts.local_experts.0.linear_fc1.weight")
    assert plan["files"][3]["ep_rank"] == 1
    assert entry["source"] == "decoder.layers.2.mlp.experts.local_experts.2.linear_fc1.weight"
    assert entry["inputs"] == ["decoder.layers.2.mlp.experts.weight1"] and entry["shape"] == [16, 32]
    assert plan["megatron_args"]["num_experts"] == 4
