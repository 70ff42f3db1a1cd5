"""Uneven pipeline stages and virtual chunks, consumed by megatron-core 0.16.1 (issue 12, item 2).

Sample checkpoints of 8 layers are converted with the real command line, then:

* every state dict of every rank file (`model`, or `model0`, `model1`, ... with virtual chunks) loads
  `strict=True` into the GPTModel chunk megatron-core builds for it: its pp rank, `vp_stage`, and the
  pre_process / post_process Megatron-LM's `get_model` gives it (`megatron_consumer.load_all_ranks_strict`),
  with the config built from the checkpoint's own args (`decoder_first/last_pipeline_num_layers`,
  `virtual_pipeline_model_parallel_size`);
* the logits equal a plain-torch forward of the logical weights (`reference_model`) within 1e-5 in fp32:
  chunks chained in one process at TP1 (uneven stages, virtual chunks, both), and with real gloo processes
  at TP2/PP2 (virtual chunks, where the last stage sends back to the first between virtual stages; uneven).
"""

from __future__ import annotations

import pytest

from ms2mg_converter.demo.sample import SampleSpec

if __package__:
    from . import megatron_consumer as mc
    from .test_megatron_consumer import INPUT_IDS, Samples, assert_matches_reference
else:
    import megatron_consumer as mc
    from test_megatron_consumer import INPUT_IDS, Samples, assert_matches_reference

pytestmark = pytest.mark.consumer

FIRST, LAST = "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"
PER_VIRTUAL, VIRTUAL = "--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank"

SPECS = {
    "gqa-8l": SampleSpec(num_layers=8),
    "mha-bias-tied-8l": SampleSpec(num_layers=8, num_query_groups=8, bias="all", tied=True),
}

# name -> (pp, flags, chunks per rank, layers of each (stage, chunk) in forward order)
LAYOUTS: dict[str, tuple[int, tuple[str, ...], int, list[int]]] = {
    "first-2": (3, (FIRST, "2"), 1, [2, 3, 3]),
    "last-3": (2, (LAST, "3"), 1, [5, 3]),
    "first-1-last-1": (4, (FIRST, "1", LAST, "1"), 1, [1, 3, 3, 1]),
    "vpp-2-layers": (2, (PER_VIRTUAL, "2"), 2, [2, 2, 2, 2]),
    "vpp-4-chunks": (2, (VIRTUAL, "4"), 4, [1] * 8),
    "vpp-1-chunk": (2, (PER_VIRTUAL, "4"), 1, [4, 4]),
    "vpp-uneven": (3, (FIRST, "2", LAST, "2", VIRTUAL, "2"), 2, [1, 2, 1, 1, 2, 1]),
    "vpp-first-only": (4, (FIRST, "2", VIRTUAL, "2"), 2, [1] * 8),
}

LOADS = [(name, spec, tp) for name in LAYOUTS for spec in SPECS for tp in (1, 2)]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    return Samples(tmp_path_factory.mktemp("pipeline-consumer"))


def converted(samples: Samples, spec: str, layout: str, tp: int) -> mc.Checkpoint:
    pp, flags, _, _ = LAYOUTS[layout]
    return mc.open_checkpoint(samples.converted(spec, tp, pp, spec=SPECS[spec], extra=flags))


@pytest.mark.parametrize(("layout", "spec", "tp"), LOADS, ids=[f"{n}-{s}-tp{t}" for n, s, t in LOADS])
def test_every_chunk_of_every_rank_loads_strict(samples: Samples, layout: str, spec: str, tp: int) -> None:
    pp, _, chunks, sizes = LAYOUTS[layout]
    ckpt = converted(samples, spec, layout, tp)
    assert (ckpt.tp, ckpt.pp, ckpt.vp) == (tp, pp, chunks)
    models = mc.load_all_ranks_strict(ckpt)
    assert sorted(models) == sorted((t, p, v) for t in range(tp) for p in range(pp) for v in range(chunks))
    built = [len(models[(0, p, v)].decoder.layers) for p, v in mc.chunk_order(ckpt)]
    assert built == sizes
    placement = mc.layer_placement(ckpt.args)  # megatron-core's own: each layer exactly once, in order
    assert [i for p, v in mc.chunk_order(ckpt) for i in placement[(p, v)]] == list(range(8))


LOGITS = [("first-1-last-1", "gqa-8l"), ("vpp-4-chunks", "gqa-8l"), ("vpp-uneven", "mha-bias-tied-8l"),
          ("vpp-first-only", "gqa-8l"), ("vpp-2-layers", "mha-bias-tied-8l")]


@pytest.mark.parametrize(("layout", "spec"), LOGITS, ids=[f"{n}-{s}" for n, s in LOGITS])
def test_logits_tp1_chunks_chained_match_reference(samples: Samples, layout: str, spec: str) -> None:
    logits = mc.logits_in_process(converted(samples, spec, layout, 1), INPUT_IDS)
    assert_matches_reference(logits, samples.reference(spec, SPECS[spec]))


@pytest.mark.slow
def test_logits_tp2_pp2_gloo_virtual_and_uneven_match_reference(samples: Samples) -> None:
    cases = [("vpp-2-layers", "gqa-8l"), ("vpp-4-chunks", "mha-bias-tied-8l"), ("last-3", "gqa-8l")]
    dirs = [converted(samples, spec, layout, 2).root for layout, spec in cases]
    for (_, spec), logits in zip(cases, mc.logits_multiprocess(dirs, INPUT_IDS), strict=True):
        assert_matches_reference(logits, samples.reference(spec, SPECS[spec]))
