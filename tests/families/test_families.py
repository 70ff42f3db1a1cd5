"""Each real MindFormers naming family converts to exactly the truth in Megatron's layout (issue 10).

The real CLI runs in a fresh process; every rank file is loaded with torch.load(weights_only=True) and each
key, dtype, shape and value must equal `expected.py`'s tensors, every `args` field the family's YAML (or
fixed architecture) states must be there, and the optimizer state must be dropped and listed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.families.case import Case
from tests.families.conftest import FAMILIES
from tests.families.expected import expected_args, expected_ranks
from tests.families.runner import arg_mismatches, convert, load_rank_files, mismatches, read_json

PARALLEL = [pytest.param(1, 1, id="tp1pp1"), pytest.param(2, 2, id="tp2pp2")]


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


@pytest.mark.parametrize(("tp", "pp"), PARALLEL)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_converts_to_the_truth_in_megatron_layout(built: Callable[[str], Case], tmp_path: Path,
                                                         family: str, tp: int, pp: int) -> None:
    case = built(family)
    dst = tmp_path / "megatron"
    # Verification runs with TP2/PP2 only: the tool's own check is not what is under test here.
    verify = () if (tp, pp) != (1, 1) else ("--no-verify",)
    r = convert(*case.cli(), "--save-dir", str(dst), "--tp", str(tp), "--pp", str(pp), *verify)
    assert r.returncode == 0, r.stderr
    problems = check_output(case, dst, tp, pp)
    assert not problems, "\n".join(problems[:40])
    manifest = read_json(dst / "ms2mg-manifest.json")
    assert set(manifest["dropped_keys"]) == case.dropped
