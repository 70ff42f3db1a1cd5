"""Uneven pipeline stages and virtual pipeline chunks: the layer assignment, the refusals, the files.

* The converter's placement (`ms2mg_converter.pipeline.placements`) equals megatron-core 0.16.1's own
  (`get_transformer_layer_offset`, `get_num_layers_to_build` on a `TransformerConfig`), for chosen layouts and
  for every layout hypothesis draws that the converter accepts; a layout megatron-core's `TransformerConfig`
  refuses, the converter refuses too.
* Bad combinations are refused with exit code 2 and a message naming the flag, before anything is written.
* Round trip: convert with uneven stages / virtual chunks, re-merge the `model` / `modelN` state dicts with
  megatron-core's placement (`roundtrip.merge_checkpoint`), compare bit for bit with the source.
* `ms2mg verify` checks every chunk (two chunks swapped on disk are found); the manifest and `ms2mg inspect`
  show which global layers each state dict holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ms2mg_converter.checks import parallelism_problems
from ms2mg_converter.config import ModelOverrides, PipelineLayout
from ms2mg_converter.pipeline import layout_problems, placements
from tests.converter.conftest import read_json, run_cli, sample_flags
from tests.converter.roundtrip import merge_checkpoint
from tests.converter.test_roundtrip import roundtrip

FIRST, LAST = "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"
PER_VIRTUAL, VIRTUAL = "--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank"


def layout(first: int | None = None, last: int | None = None, per_virtual: int | None = None,
           virtual: int | None = None) -> PipelineLayout:
    return PipelineLayout(decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last,
                          num_layers_per_virtual_pipeline_stage=per_virtual,
                          num_virtual_stages_per_pipeline_rank=virtual)


def megatron_placement(num_layers: int, pp: int, lay: PipelineLayout) -> dict[tuple[int, int], range]:
    """(stage, chunk) -> global layers, as megatron-core builds them for this layout."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    vp = lay.num_virtual_stages_per_pipeline_rank  # as Megatron-LM's validate_args derives it
    if lay.num_layers_per_virtual_pipeline_stage is not None:
        vp = num_layers // pp // lay.num_layers_per_virtual_pipeline_stage
    config = TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=8,
                               pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
                               num_layers_in_first_pipeline_stage=lay.decoder_first_pipeline_num_layers,
                               num_layers_in_last_pipeline_stage=lay.decoder_last_pipeline_num_layers,
                               pipeline_dtype=torch.float32)
    out = {}
    for p in range(pp):
        for v in range(vp or 1):
            stage = None if vp is None else v
            start = get_transformer_layer_offset(config, stage, p)
            out[(p, v)] = range(start, start + get_num_layers_to_build(config, stage, p))
    return out


def ours(num_layers: int, pp: int, lay: PipelineLayout) -> dict[tuple[int, int], range]:
    return {(p, v): c.layers for p, chunks in enumerate(placements(num_layers, pp, lay)) for v, c in enumerate(chunks)}


# --------------------------------------------------------------------------------------------- placement

LAYOUTS = [
    (8, 1, layout()),
    (8, 4, layout()),
    (8, 2, layout(per_virtual=2)),                      # stage 0: [0,1] [4,5]; stage 1: [2,3] [6,7]
    (8, 2, layout(per_virtual=1)),                      # four chunks per stage
    (8, 2, layout(per_virtual=4)),                      # one chunk: no interleaving, key "model"
    (16, 4, layout(virtual=2)),
    (10, 3, layout(first=2)),                           # 2 | 4 | 4
    (10, 3, layout(last=2)),                            # 4 | 4 | 2
    (10, 4, layout(first=1, last=3)),                   # 1 | 3 | 3 | 3
    (10, 2, layout(first=3, last=7)),
    (10, 3, layout(first=2, last=4, virtual=2)),        # 2 | 4 | 4, two chunks each
    (28, 4, layout(first=4, virtual=4)),                # 4 | 8 | 8 | 8, four chunks each
    (12, 3, layout(last=6, virtual=3)),
]


@pytest.mark.parametrize(("num_layers", "pp", "lay"), LAYOUTS, ids=[f"L{n}-pp{p}-{lay.model_dump(exclude_none=True)}"
                                                                   for n, p, lay in LAYOUTS])
def test_placement_is_megatron_cores(num_layers: int, pp: int, lay: PipelineLayout) -> None:
    assert layout_problems(num_layers, pp, lay) == []
    got = ours(num_layers, pp, lay)
    assert got == megatron_placement(num_layers, pp, lay)
    assert sorted(i for r in got.values() for i in r) == list(range(num_layers))  # every layer exactly once


def test_interleaving_example_from_megatron_docs() -> None:
    chunks = placements(8, 2, layout(per_virtual=2))
    assert [[(c.key, list(c.layers)) for c in stage] for stage in chunks] == [
        [("model0", [0, 1]), ("model1", [4, 5])], [("model0", [2, 3]), ("model1", [6, 7])]]
    assert [[(c.pre_process, c.post_process) for c in stage] for stage in chunks] == [
        [(True, False), (False, False)], [(False, False), (False, True)]]
    assert [c.key for c in placements(8, 2, layout(per_virtual=4))[0]] == ["model"]


_OPTIONAL = st.none() | st.integers(1, 12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.integers(1, 24), pp=st.integers(1, 6), first=_OPTIONAL, last=_OPTIONAL,
       vpp=st.sampled_from(["none", "per_virtual", "virtual"]), n=st.integers(1, 6))
def test_accepted_layouts_match_megatron_core_and_its_refusals_are_ours(num_layers: int, pp: int, first: int | None,
                                                                       last: int | None, vpp: str, n: int) -> None:
    lay = layout(first, last, n if vpp == "per_virtual" else None, n if vpp == "virtual" else None)
    problems = layout_problems(num_layers, pp, lay)
    if problems:
        try:
            megatron = megatron_placement(num_layers, pp, lay)
        except (ValueError, AssertionError, ZeroDivisionError):
            event("refused by both")
            return
        # megatron-core's config accepts a few things Megatron-LM's argument checks or common sense refuse
        # (pipeline flags with PP 1, --num-layers-per-virtual-pipeline-stage with uneven stages, a stage with
        # no layers, layers that are never built); say which, so a real difference would show
        event("refused by the converter only")
        built = sorted(i for r in megatron.values() for i in r)
        assert (pp == 1 or lay.num_layers_per_virtual_pipeline_stage is not None or built != list(range(num_layers))
                or any(len(r) == 0 for r in megatron.values())), (problems, megatron)
        return
    event(f"accepted: {'uneven' if first or last else 'even'}, {vpp if pp > 1 else 'pp1'}")
    assert ours(num_layers, pp, lay) == megatron_placement(num_layers, pp, lay)


@st.composite
def valid_layouts(draw: st.DrawFn) -> tuple[int, int, PipelineLayout]:
    """Layouts built to be valid: per-stage chunk counts times the chunk count, the flags that describe them."""
    pp = draw(st.integers(2, 6))
    v = draw(st.sampled_from([None, 1, 2, 3, 4]))
    per = draw(st.integers(1, 3))  # chunks' layers on every stage in between
    first = draw(st.none() | st.integers(1, 4).map(lambda n: n * (v or 1)))
    last = draw(st.none() | st.integers(1, 4).map(lambda n: n * (v or 1)))
    if pp == 2 and v is not None and first is not None:
        last = None  # megatron-core cannot place virtual chunks on two uneven stages (see REFUSED)
    num_layers = (first or per * (v or 1)) + (last or per * (v or 1)) + (pp - 2) * per * (v or 1)
    if first is None and last is None and v is not None and draw(st.booleans()):
        return num_layers, pp, layout(per_virtual=num_layers // pp // v)
    return num_layers, pp, layout(first, last, virtual=v)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=valid_layouts())
def test_valid_uneven_and_virtual_layouts_match_megatron_core(case: tuple[int, int, PipelineLayout]) -> None:
    num_layers, pp, lay = case
    assert layout_problems(num_layers, pp, lay) == []
    uneven = lay.decoder_first_pipeline_num_layers or lay.decoder_last_pipeline_num_layers
    virtual = lay.num_virtual_stages_per_pipeline_rank or lay.num_layers_per_virtual_pipeline_stage
    event(f"{'uneven' if uneven else 'even'}, {'virtual' if virtual else 'no virtual'}")
    assert ours(num_layers, pp, lay) == megatron_placement(num_layers, pp, lay)


# ------------------------------------------------------------------------------------------- refusals

REFUSED = [
    (8, 2, layout(first=3, last=3), [FIRST, LAST, "add up to num_layers (8)"]),
    (4, 3, layout(first=3, last=3), [FIRST, LAST, "0 of the 4 layers"]),
    (10, 3, layout(first=3), [FIRST, "7 layers left", "not divisible by the 2 other stage"]),
    (8, 1, layout(first=4), [FIRST, "--target-pipeline-parallel-size is 1"]),
    (8, 1, layout(virtual=2), [VIRTUAL, "--target-pipeline-parallel-size is 1"]),
    (8, 2, layout(per_virtual=2, virtual=2), [PER_VIRTUAL, VIRTUAL, "only one"]),
    (8, 2, layout(first=2, per_virtual=1), [PER_VIRTUAL, FIRST, VIRTUAL]),
    (8, 2, layout(per_virtual=3), [PER_VIRTUAL, "4 layers per pipeline stage"]),
    (8, 2, layout(virtual=3), [VIRTUAL, "4 layers per pipeline stage"]),
    (10, 3, layout(first=3, virtual=2), [FIRST, "(3)", VIRTUAL]),
    (14, 4, layout(first=2, last=2, virtual=2), [VIRTUAL, "5 layers of each other stage"]),
    (9, 2, layout(), ["num_layers (9)", "pipeline parallel size (2)", FIRST]),
    # megatron-core's get_transformer_layer_offset divides by zero here (no stage in between)
    (8, 2, layout(first=4, last=4, virtual=2), [FIRST, LAST, VIRTUAL, "give only"]),
]


def test_megatron_core_cannot_place_chunks_on_two_uneven_stages() -> None:
    """Why the last REFUSED case is refused: the consumer fails on it (the same layout with only the first
    stage given builds fine)."""
    with pytest.raises(ZeroDivisionError):
        megatron_placement(8, 2, layout(first=4, last=4, virtual=2))
    assert ours(8, 2, layout(first=4, virtual=2)) == megatron_placement(8, 2, layout(first=4, virtual=2))


@pytest.mark.parametrize(("num_layers", "pp", "lay", "words"), REFUSED)
def test_bad_layouts_are_refused_naming_the_flag(num_layers: int, pp: int, lay: PipelineLayout,
                                                 words: list[str]) -> None:
    problems = parallelism_problems(ModelOverrides(num_layers=num_layers), 1, pp, lay)
    assert problems
    text = "; ".join(problems)
    for word in words:
        assert word in text, (word, text)


def test_flag_rules_are_checked_before_the_layers_are_known() -> None:
    """The operator's pre-flight check has no layer count until the tensors are read."""
    assert parallelism_problems(ModelOverrides(), 1, 1, layout(virtual=2))
    assert parallelism_problems(ModelOverrides(), 1, 4, layout(first=2, per_virtual=2))
    assert parallelism_problems(ModelOverrides(), 1, 4, layout(first=3, virtual=2))
    assert parallelism_problems(ModelOverrides(), 1, 4, layout(first=2, last=2, virtual=2)) == []


CLI_REFUSED = [
    (["--pp", "2", FIRST, "3", LAST, "3"], [FIRST, LAST]),
    (["--pp", "1", VIRTUAL, "2"], [VIRTUAL]),
    (["--pp", "2", FIRST, "1", PER_VIRTUAL, "1"], [PER_VIRTUAL, VIRTUAL]),
    (["--pp", "2", LAST, "0"], [LAST]),
]


@pytest.mark.parametrize(("flags", "words"), CLI_REFUSED, ids=["sum", "vpp-pp1", "per-virtual-uneven", "zero"])
def test_cli_refuses_with_exit_2_and_names_the_flag(make_sample, tmp_path: Path, flags: list[str],
                                                    words: list[str]) -> None:
    src, spec, _ = make_sample()
    dst = tmp_path / "out"
    r = run_cli("convert", "--load-dir", str(src), "--save-dir", str(dst), *sample_flags(spec), *flags,
                "--result-file", str(tmp_path / "r.json"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for word in words:
        assert word in r.stderr, (word, r.stderr)
    assert not dst.exists()
    assert read_json(tmp_path / "r.json")["exitCode"] == 2


# ----------------------------------------------------------------------------------------- round trips

ROUND_TRIPS = [
    (1, 3, (FIRST, "2")),
    (2, 3, (LAST, "2")),
    (2, 4, (FIRST, "1", LAST, "3")),
    (1, 2, (PER_VIRTUAL, "2")),
    (2, 2, (VIRTUAL, "4")),
    (1, 2, (PER_VIRTUAL, "4")),                      # one chunk: plain "model"
    (2, 3, (FIRST, "2", LAST, "2", VIRTUAL, "2")),
]


@pytest.mark.parametrize(("tp", "pp", "flags"), ROUND_TRIPS, ids=["-".join(f) for _, _, f in ROUND_TRIPS])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip(make_sample, convert, tmp_path: Path, tp: int, pp: int, flags: tuple[str, ...],
                    tied: bool) -> None:
    roundtrip(make_sample, convert, tmp_path, tp, pp, extra=flags, num_layers=8, tied=tied, bias="all",
              true_vocab=1000)


def test_round_trip_transformer_engine_names_with_chunks(make_sample, convert, tmp_path: Path) -> None:
    roundtrip(make_sample, convert, tmp_path, 2, 3, num_layers=8, normalization="LayerNorm", true_vocab=1000,
              extra=("--saver-transformer-impl", "transformer_engine", FIRST, "4", VIRTUAL, "2"))


# --------------------------------------------------------------------------------- files, verify, report

def _convert_vpp(make_sample, convert, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """8 layers on PP 3 as 2 | 4 | 2, two chunks per stage: stage 0 holds [0] [4], stage 1 [1,2] [5,6]."""
    src, spec, _ = make_sample(num_layers=8)
    dst = tmp_path / "vpp"
    flags = [*sample_flags(spec), "--pp", "3", FIRST, "2", LAST, "2", VIRTUAL, "2"]
    assert convert(src, dst, *flags) == 0
    return src, dst, flags


def _load(path: Path) -> dict[str, object]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def test_rank_files_args_and_manifest(make_sample, convert, tmp_path: Path) -> None:
    _, dst, _ = _convert_vpp(make_sample, convert, tmp_path)
    sd = _load(dst / "iter_0000001/mp_rank_00_001/model_optim_rng.pt")
    assert list(sd) == ["args", "checkpoint_version", "iteration", "model0", "model1",
                        "num_floating_point_operations_so_far"]
    args = vars(sd["args"])
    assert {k: args[k] for k in ("pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                                 "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                                 "num_virtual_stages_per_pipeline_rank", "num_layers_per_virtual_pipeline_stage")} \
        == {"pipeline_model_parallel_size": 3, "virtual_pipeline_model_parallel_size": 2,
            "decoder_first_pipeline_num_layers": 2, "decoder_last_pipeline_num_layers": 2,
            "num_virtual_stages_per_pipeline_rank": 2, "num_layers_per_virtual_pipeline_stage": None}
    manifest = read_json(dst / "ms2mg-manifest.json")
    assert [f["layers"] for f in manifest["files"]] == [
        {"model0": [0], "model1": [4]}, {"model0": [1, 2], "model1": [5, 6]}, {"model0": [3], "model1": [7]}]


def test_verify_checks_every_chunk(make_sample, convert, tmp_path: Path) -> None:
    src, dst, flags = _convert_vpp(make_sample, convert, tmp_path)
    ok = run_cli("verify", "--load-dir", str(src), "--save-dir", str(dst))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    path = dst / "iter_0000001/mp_rank_00_001/model_optim_rng.pt"
    sd = _load(path)
    sd["model0"], sd["model1"] = sd["model1"], sd["model0"]  # same keys and shapes, other layers
    torch.save(sd, path)
    (dst / "ms2mg-manifest.json").unlink()  # only the tensor comparison can tell now
    bad = run_cli("verify", "--load-dir", str(src), "--save-dir", str(dst), *flags)
    assert bad.returncode == 5, bad.stdout + bad.stderr
    assert "model0: decoder.layers.0." in bad.stdout and "mp_rank_00_001" in bad.stdout


def test_inspect_shows_the_layer_assignment(make_sample, tmp_path: Path) -> None:
    src, spec, _ = make_sample(num_layers=8)
    flags = [*sample_flags(spec), "--pp", "3", FIRST, "2", LAST, "2", VIRTUAL, "2"]
    text = run_cli("inspect", "--load-dir", str(src), *flags)
    assert text.returncode == 0, text.stderr
    assert "stage 0: model0 layer 0 +embedding, model1 layer 4" in text.stdout
    assert "stage 2: model0 layer 3, model1 layer 7 +final norm/output" in text.stdout
    js = run_cli("inspect", "--load-dir", str(src), "--json", *flags)
    files = json.loads(js.stdout)["files"]
    assert files[1]["layers"] == {"model0": [1, 2], "model1": [5, 6]}
    assert {e["model"] for e in files[1]["entries"]} == {"model0", "model1"}


def test_merge_sees_uneven_stages(make_sample, convert, tmp_path: Path) -> None:
    """The helper itself: a PP3 checkpoint with 2 | 3 | 3 layers merges to layers 0..7."""
    src, spec, _ = make_sample(num_layers=8)
    dst = tmp_path / "uneven"
    assert convert(src, dst, *sample_flags(spec), "--pp", "3", FIRST, "2") == 0
    merged, args = merge_checkpoint(dst)
    assert args.decoder_first_pipeline_num_layers == 2
    layers = {int(k.split(".")[2]) for k in merged if k.startswith("decoder.layers.")}
    assert layers == set(range(8))
