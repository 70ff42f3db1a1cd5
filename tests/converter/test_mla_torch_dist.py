"""`--ckpt-format torch_dist` for multi-latent attention (issue 12 items 1 and 4 together).

megatron-core 0.16.1's local MLA spec has no `sharded_state_dict_keys_map` (gpt_layer_specs.py), so its sharded
keys for the q/kv norms and a dense layer's pre-MLP norm differ from the TE spec's (`linear_q_up_proj.
layer_norm_weight`, `linear_kv_up_proj.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`). ms2mg writes
both names (`plan.target._mla_local_only`), so one checkpoint loads under either spec. Checked here:

* the local spec, for real: megatron-core builds each rank's MLA GPTModel, `dist_checkpointing.load` fills
  its `sharded_state_dict()`, `load_state_dict(strict=True)`; every parameter equals the `torch`-format rank
  file of the same layout: TP1/PP1 in process (its logits match the independent DeepSeek reference of
  mla_fixture) and TP2/PP2 on gloo ranks (access integrity validated), each from a conversion made for
  another layout (resharded on load);
* the TE spec, by names and values only (TransformerEngine has no CPU build): every tensor of a TE-named
  `torch`-format TP1 conversion is stored under the same sharded key with the same values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.converter import dist_consumer as dc
from tests.converter import megatron_consumer as mc
from tests.converter.mla_fixture import VARIANTS, VOCAB, mla_flags, reference_logits, run_convert, sources
from tests.converter.test_torch_dist import read_dcp
from tests.families.runner import load_rank_files

__all__ = ["sources"]  # the module fixture, used by name

pytestmark = pytest.mark.consumer

DIST = ("--ckpt-format", "torch_dist")
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _convert(sources: dict, tmp: Path, name: str, *flags: str) -> Path:
    save = tmp / f"{name}-{'-'.join(f.lstrip('-') for f in flags)}"
    if not save.exists():
        run_convert(sources[name][0], save, *mla_flags(name), *flags)
    return save


@pytest.mark.parametrize("name", ["concat", "split-noq"])
def test_local_spec_in_process_loads_strict_equals_torch_format_and_logits(sources: dict, tmp_path: Path,
                                                                           name: str) -> None:
    """A torch_dist checkpoint converted for TP2/PP2, loaded as TP1/PP1 (a world of one holds only the whole
    model: see test_torch_dist_consumer)."""
    ckpt = dc.open_dist(_convert(sources, tmp_path, name, *DIST, "--tp", "2", "--pp", "2"))
    truth = mc.open_checkpoint(_convert(sources, tmp_path, name, "--tp", "1"))
    args = dc.with_layout(ckpt.args, 1, 1)
    model = dc.load_dist_rank(ckpt, args, 0, 0, 0)
    problems = dc.compare_rank(model, truth.load_rank(0, 0)["model"], "TP1/PP1")
    assert not problems, "\n".join(problems)
    want = reference_logits(sources[name][1], IDS, VARIANTS[name][0])
    got = dc.dist_logits(ckpt, args, IDS)
    assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()
    assert torch.equal(got, dc.dist_logits(dc.open_dist(_convert(sources, tmp_path, name, *DIST)), args, IDS))


def test_local_spec_tp2_pp2_gloo_ranks_equal_torch_format(sources: dict, tmp_path: Path) -> None:
    """Real TP2/PP2 ranks (both variants in one gloo world of 4) from TP1/PP1 conversions: every rank equals
    the TP2/PP2 torch-format conversion (resharded by megatron-core itself on load)."""
    jobs = []
    for name in ("concat", "split-noq"):
        ckpt = dc.open_dist(_convert(sources, tmp_path, name, *DIST))
        jobs.append((ckpt, _convert(sources, tmp_path, name, "--tp", "2", "--pp", "2"),
                     dc.with_layout(ckpt.args, 2, 2)))
    problems = dc.compare_multiprocess(jobs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["concat", "split-noq"])
def test_te_names_are_stored_with_the_te_rank_values(sources: dict, tmp_path: Path, name: str) -> None:
    stored, _ = read_dcp(_convert(sources, tmp_path, name, *DIST) / "iter_0000001")
    te = load_rank_files(_convert(sources, tmp_path, name, "--saver-transformer-impl", "transformer_engine"))
    (rank,) = te.values()
    checked = 0
    for key, value in rank["model"].items():
        if not isinstance(value, torch.Tensor):
            continue
        parts = key.split(".")
        if key.startswith("decoder.layers."):
            layer, sharded = int(parts[2]), ".".join(["decoder", "layers", *parts[3:]])
            assert sharded in stored, f"{sharded} (TE name) is not in the torch_dist checkpoint"
            assert torch.equal(stored[sharded][layer], value), key
        elif key != "output_layer.weight" or key in stored:
            assert torch.equal(stored[key], value), key
        checked += 1
    assert checked >= 15
    local_only = {"decoder.layers.self_attention.kv_layernorm.weight", "decoder.layers.pre_mlp_layernorm.weight"}
    assert local_only <= stored.keys()
