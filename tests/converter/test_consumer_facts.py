"""What a TransformerEngine build of Megatron loads, and model facts that change the numbers (issue 10).

* The DEFAULT output (with `decoder.final_layernorm._extra_state`, as Megatron with TransformerEngine writes
  it) loads strict into megatron-core 0.16.1 whose final norm carries TE's extra state, and computes the
  reference logits; so does `--saver-transformer-impl transformer_engine` (TE layer-spec names), mapped onto
  the local modules by megatron-core's own `mcore_gpt_load_te_state_dict_pre_hook` (see
  `megatron_consumer.te_like`; TransformerEngine itself has no CPU build).
* A model trained with RoPE base 500000 computes the reference logits only when the base is stated
  (`--rotary-base` or the YAML); the default 10000 gives other logits, and the result reports it as defaulted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ms2mg_converter.demo.sample import SampleSpec, build_sample

if __package__:
    from . import megatron_consumer as mc
    from . import reference_model as ref
    from .test_megatron_consumer import (
        FP32_ATOL,
        INPUT_IDS,
        WRONG_LAYOUT_MIN_DIFF,
        assert_matches_reference,
        run_convert,
    )
    from .test_megatron_consumer import convert_flags as base_flags
else:
    import megatron_consumer as mc
    import reference_model as ref
    from test_megatron_consumer import (
        FP32_ATOL,
        INPUT_IDS,
        WRONG_LAYOUT_MIN_DIFF,
        assert_matches_reference,
        run_convert,
    )
    from test_megatron_consumer import convert_flags as base_flags

pytestmark = pytest.mark.consumer

SPEC = SampleSpec(bias="qkv", qk_layernorm=True, kv_channels=16)
TRAINED_BASE = 500000.0


def _flags(tp: int, pp: int, *extra: str) -> list[str]:
    """The consumer's flags without `--no-final-norm-extra-state`: Megatron's default (TE) output."""
    return [f for f in base_flags(SPEC, tp, pp) if f != "--no-final-norm-extra-state"] + list(extra)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    src = tmp_path_factory.mktemp("facts") / "src"
    return src, build_sample(SPEC, src)


def _reference(weights: dict[str, torch.Tensor], base: float) -> torch.Tensor:
    return ref.reference_logits(ref.rounded(weights, SPEC), SPEC, INPUT_IDS, rotary_base=base)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_default_output_loads_strict_into_a_te_build(source: tuple[Path, dict[str, torch.Tensor]],
                                                     tmp_path: Path, tp: int, pp: int, impl: str) -> None:
    src, _ = source
    dst = run_convert(src, tmp_path / "out", _flags(tp, pp, "--saver-transformer-impl", impl))
    ckpt = mc.open_checkpoint(dst)
    last = ckpt.load_rank(0, pp - 1)["model"]
    assert "decoder.final_layernorm._extra_state" in last and last["decoder.final_layernorm._extra_state"] is None
    te = "te-names" if impl == "transformer_engine" else "final-norm"
    assert len(mc.load_all_ranks_strict(ckpt, te=te)) == tp * pp
    with pytest.raises(AssertionError, match="_extra_state"):  # a build without TE refuses the default output
        mc.load_all_ranks_strict(ckpt, te=None if impl == "local" else "final-norm")


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_default_output_computes_the_reference_logits(source: tuple[Path, dict[str, torch.Tensor]],
                                                      tmp_path: Path, impl: str) -> None:
    src, weights = source
    dst = run_convert(src, tmp_path / "out", _flags(1, 2, "--saver-transformer-impl", impl))
    te = "te-names" if impl == "transformer_engine" else "final-norm"
    logits = mc.logits_in_process(mc.open_checkpoint(dst), INPUT_IDS, te=te)
    assert_matches_reference(logits, _reference(weights, ref.ROTARY_BASE))


def test_a_wrong_rope_base_gives_wrong_logits(source: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """The model was trained with base 500000. Stated, the logits match; defaulted (10000), they do not."""
    src, weights = source
    reference = _reference(weights, TRAINED_BASE)
    stated = run_convert(src, tmp_path / "stated", _flags(1, 1, "--rotary-base", str(int(TRAINED_BASE))))
    ckpt = mc.open_checkpoint(stated)
    assert ckpt.args.rotary_base == TRAINED_BASE
    assert_matches_reference(mc.logits_in_process(ckpt, INPUT_IDS, te="final-norm"), reference, FP32_ATOL)

    result = tmp_path / "result.json"
    defaulted = run_convert(src, tmp_path / "defaulted", _flags(1, 1, "--result-file", str(result)))
    assert "rotary_base" in json.loads(result.read_text())["defaulted"]
    logits = mc.logits_in_process(mc.open_checkpoint(defaulted), INPUT_IDS, te="final-norm")
    diff = (logits[..., :reference.shape[-1]] - reference).abs().max().item()
    assert diff > WRONG_LAYOUT_MIN_DIFF / 5, f"RoPE base 10000 instead of 500000 moved the logits by only {diff:.3g}"
