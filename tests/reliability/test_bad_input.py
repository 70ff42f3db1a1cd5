"""The bad-input corpus (corpus.py), each case run as a real `python -m ms2mg_converter convert` process.

Every case must end with: its documented exit code; exactly one `ms2mg: error:` paragraph on stderr naming
the file, tensor or flag at fault, and no traceback; a `--result-file` JSON with status Failed, the reason
and the exit code; and nothing left at or beside the destination (no staging directory, a pre-existing
destination unchanged).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.conftest import record
from tests.reliability.corpus import CASES, Case, Ctx, Unsupported, command_for, execute, flags_for, problems, run_case

_OUTCOMES: dict[str, dict[str, object]] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, world: Path) -> None:
    try:
        outcome = run_case(case, world)
    except Unsupported as e:
        pytest.skip(str(e))
    _OUTCOMES[case.name] = {"exit": outcome.exit_code, "reason": (outcome.result or {}).get("reason"),
                            "message": outcome.message.replace(str(world), "$TMP"),
                            "leftovers": outcome.leftovers, "destination_changed": outcome.destination_changed,
                            "seconds": round(outcome.seconds, 2), **outcome.extra}
    record("bad_input", _OUTCOMES)
    assert problems(case, outcome) == [], outcome.stderr


def test_the_corpus_is_big_and_unambiguous() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) >= 25
    assert {c.exit_code for c in CASES} == {2, 3, 4, 6, 130}


def test_a_valid_sample_converts_with_the_corpus_flags(world: Path) -> None:
    """The control: the sample every case starts from converts, so each refusal is caused by its defect."""
    ctx = Ctx(world)
    ctx.sample()
    case = Case("control", "valid sample", lambda c: [], 0, "Converted", ())
    code, stderr, _ = execute(case, command_for(case, ctx, flags_for(ctx.spec)), dict(os.environ))
    assert code == 0, stderr
    assert (ctx.dst / "ms2mg-manifest.json").is_file()
