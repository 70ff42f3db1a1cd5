"""Each real MindFormers naming family converts to exactly the truth in Megatron's layout (issue 10).

The real CLI runs in a fresh process; every rank file is loaded with torch.load(weights_only=True) and each
key, dtype, shape and value must equal `expected.py`'s tensors, every `args` field the family's YAML (or
fixed architecture) states must be there, and the optimizer state must be dropped and listed.
Conversions run with `--no-verify`: the converter's own check is not what is under test (this comparison
is), and skipping it halves the CPU time of the folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.families.case import Case
from tests.families.conftest import FAMILIES, Conversion
from tests.families.expected import expected_args, expected_ranks
from tests.families.runner import arg_mismatches, load_rank_files, mismatches, read_json

MATRIX = [pytest.param(f, tp, pp, id=f"{f}-tp{tp}pp{pp}") for f in FAMILIES for tp, pp in ((1, 1), (2, 2))
          if (f, tp) != ("qwen3-r1.7-yaml-layouts", 2)]
"""Every family at TP1/PP1 and TP2/PP2 (the YAML-layouts variant of Qwen3 r1.7 differs only in the YAML)."""


def check_output(case: Case, save_dir: Path, tp: int, pp: int, final_extra: bool = True) -> list[str]:
    """Every problem of a finished conversion against the truth (empty: bit-exact, right args)."""
    files = load_rank_files(save_dir)
    expected = expected_ranks(case.truth, tp, pp, final_extra)
    problems = [f"rank files: expected {sorted(expected)}, got {sorted(files)}"] if set(files) != set(expected) \
        else []
    want_args = {**expected_args(case.truth.dims, tp, pp), **case.stated_args}
    for name in sorted(expected.keys() & files.keys()):
        problems += [f"{name}: {p}" for p in mismatches(expected[name], files[name]["model"])]
        problems += [f"{name}: {p}" for p in arg_mismatches(want_args, files[name]["args"])]
    return problems


@pytest.mark.parametrize(("family", "tp", "pp"), MATRIX)
def test_family_converts_to_the_truth_in_megatron_layout(converted: Callable[[str, int, int], Conversion],
                                                         family: str, tp: int, pp: int) -> None:
    run = converted(family, tp, pp)
    assert run.process.returncode == 0, run.process.stderr
    problems = check_output(run.case, run.save_dir, tp, pp)
    assert not problems, "\n".join(problems[:40])
    manifest = read_json(run.save_dir / "ms2mg-manifest.json")
    assert set(manifest["dropped_keys"]) == run.case.dropped


FACTS = ("rotary_base", "rotary_percent", "rotary_interleaved", "norm_epsilon", "max_position_embeddings")
"""Model facts the tensors cannot tell (issue item 3): a value the YAML states is not a default."""


@pytest.mark.parametrize("family", list(FAMILIES))
def test_facts_the_family_states_are_not_reported_as_defaulted(
        converted: Callable[[str, int, int], Conversion], family: str) -> None:
    run = converted(family, 1, 1)
    assert run.process.returncode == 0, run.process.stderr
    result = read_json(run.result_file)
    assert isinstance(result.get("defaulted"), list), result
    stated = {f for f in FACTS if f in run.case.stated_args}
    assert not stated & set(result["defaulted"]), result["defaulted"]
