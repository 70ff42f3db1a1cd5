"""`--ckpt-format torch_dist` loaded by megatron-core 0.16.1's `dist_checkpointing.load` (issue 12 items 1-2).

Sample checkpoints are converted with the real command line twice: as torch_dist and as the `torch` format
(the truth: its rank files load strict and give the reference logits in test_megatron_consumer and
test_pipeline_consumer). Then megatron-core builds each rank's GPTModel chunk, fills its
`sharded_state_dict()` from the torch_dist checkpoint (DCP reads and reshards the global per-layer chunks),
loads it `strict=True`, and every parameter must equal the torch-format rank file of the same layout:

* TP1/PP1, in this process (a world of one can hold only the whole model: megatron-core places the layer
  and TP fragments a rank does not hold on rank `(rank + 1) % world_size`), from TP1/PP1 and TP2/PP2
  conversions; its logits equal the torch format's bit for bit and the plain-torch reference within 1e-5;
* every other layout with real gloo processes (`validate_access_integrity=True`): TP2 from a TP2 conversion
  (its own layout) and from a TP1 one (resharded), uneven stages, virtual chunks, uneven stages with virtual
  chunks, each from its own conversion and from a conversion made for another layout (torch_dist stores
  global layers, so one checkpoint serves them all).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from ms2mg_converter.demo.sample import SampleSpec

if __package__:
    from . import dist_consumer as dc
    from . import megatron_consumer as mc
    from .test_megatron_consumer import INPUT_IDS, Samples, assert_matches_reference
else:
    import dist_consumer as dc
    import megatron_consumer as mc
    from test_megatron_consumer import INPUT_IDS, Samples, assert_matches_reference

pytestmark = pytest.mark.consumer

DIST = ("--ckpt-format", "torch_dist")
FIRST, LAST = "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"
VIRTUAL = "--num-virtual-stages-per-pipeline-rank"
SPECS = {
    "gqa-8l": SampleSpec(num_layers=8),
    "qk-norm-bias-tied-8l": SampleSpec(num_layers=8, qk_layernorm=True, bias="all", tied=True, kv_channels=16),
}
# name -> (tp, pp, flags, Megatron's pipeline fields for `dc.with_layout`)
LAYOUTS: dict[str, tuple[int, int, tuple[str, ...], dict[str, int]]] = {
    "tp1-pp1": (1, 1, (), {}),
    "tp1-pp2": (1, 2, (), {}),
    "uneven-pp3": (1, 3, (FIRST, "2", LAST, "2"),
                   {"decoder_first_pipeline_num_layers": 2, "decoder_last_pipeline_num_layers": 2}),
    "vpp-uneven-pp3": (1, 3, (FIRST, "2", LAST, "2", VIRTUAL, "2"),
                       {"decoder_first_pipeline_num_layers": 2, "decoder_last_pipeline_num_layers": 2,
                        "num_virtual_stages_per_pipeline_rank": 2}),
    "vpp-pp2": (1, 2, (VIRTUAL, "4"), {"num_virtual_stages_per_pipeline_rank": 4}),
}
# loaded as -> [(spec, the layout the torch_dist checkpoint was converted for)]; each runs in tp·pp gloo processes
GLOO_LOADS: dict[str, list[tuple[str, str]]] = {
    "tp2-pp1": [("gqa-8l", "tp2-pp1"), ("gqa-8l", "tp1-pp1")],
    "uneven-pp3": [("gqa-8l", "tp2-pp2")],
    "vpp-uneven-pp3": [("gqa-8l", "vpp-uneven-pp3"), ("qk-norm-bias-tied-8l", "tp2-pp2")],
    "vpp-pp2": [("gqa-8l", "tp1-pp1"), ("qk-norm-bias-tied-8l", "tp2-pp2")],
}
LAYOUTS["tp2-pp1"] = (2, 1, (), {})
LAYOUTS["tp2-pp2"] = (2, 2, (), {})


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    return Samples(tmp_path_factory.mktemp("torch-dist-consumer"))


def dist(samples: Samples, spec: str, layout: str) -> dc.DistCheckpoint:
    tp, pp, flags, _ = LAYOUTS[layout]
    return dc.open_dist(samples.converted(spec, tp, pp, spec=SPECS[spec], extra=(*DIST, *flags)))


def legacy(samples: Samples, spec: str, layout: str) -> mc.Checkpoint:
    tp, pp, flags, _ = LAYOUTS[layout]
    return mc.open_checkpoint(samples.converted(spec, tp, pp, spec=SPECS[spec], extra=flags))


def as_layout(ckpt: dc.DistCheckpoint, layout: str) -> argparse.Namespace:
    tp, pp, _, fields = LAYOUTS[layout]
    return dc.with_layout(ckpt.args, tp, pp, **fields)


@pytest.mark.parametrize(("spec", "converted"), [("gqa-8l", "tp1-pp1"), ("gqa-8l", "tp2-pp2"),
                                                  ("qk-norm-bias-tied-8l", "tp2-pp2")])
def test_tp1_pp1_in_process_loads_strict_equals_torch_format_and_logits(samples: Samples, spec: str,
                                                                        converted: str) -> None:
    ckpt = dist(samples, spec, converted)
    args = as_layout(ckpt, "tp1-pp1")
    truth = legacy(samples, spec, "tp1-pp1")
    model = dc.load_dist_rank(ckpt, args, 0, 0, 0)
    problems = dc.compare_rank(model, truth.load_rank(0, 0)["model"], "TP1/PP1")
    assert not problems, "\n".join(problems)
    logits = dc.dist_logits(ckpt, args, INPUT_IDS)
    assert torch.equal(logits, mc.logits_in_process(truth, INPUT_IDS))
    assert_matches_reference(logits, samples.reference(spec, SPECS[spec]))


@pytest.mark.parametrize("loaded", list(GLOO_LOADS))
def test_gloo_every_rank_loads_strict_and_equals_torch_format(samples: Samples, loaded: str) -> None:
    """Real ranks (tp·pp gloo processes, access integrity validated): every chunk of every rank of the
    loading layout equals the torch-format conversion made for that layout."""
    jobs = []
    for spec, converted in GLOO_LOADS[loaded]:
        ckpt = dist(samples, spec, converted)
        jobs.append((ckpt, legacy(samples, spec, loaded).root, as_layout(ckpt, loaded)))
    problems = dc.compare_multiprocess(jobs)
    assert not problems, "\n".join(problems)
