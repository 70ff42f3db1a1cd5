"""Issue 10's demands beyond "each family converts": refusals, wrong layouts, source TP, defaulted facts.

Every test runs the real CLI against a family fixture (see the fam_*.py docstrings for the MindFormers
sources). Exit codes are README.md's: 2 = bad, contradictory or missing flags.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.families import fam_glm4, fam_llama3, fam_qwen25
from tests.families.case import Case
from tests.families.mfio import OPTIMIZERS
from tests.families.runner import convert, load_rank_files, read_json
from tests.families.test_families import check_output

USAGE = 2


@pytest.mark.parametrize("version", ["r1.3", "r1.4"])
def test_legacy_fused_without_layout_information_is_refused(built: Callable[[str], Case], tmp_path: Path,
                                                             version: str) -> None:
    """A YAML with only `qkv_concat: True` cannot tell r1.3's [Q;K;V] from r1.4's grouped rows: ask."""
    case = built(f"qwen2.5-legacy-{version}")
    dst = tmp_path / "megatron"
    r = convert(*case.cli(with_flags=False), "--save-dir", str(dst))
    assert r.returncode == USAGE, r.stderr
    assert "--qkv-layout" in r.stderr
    assert not dst.exists()


def test_legacy_fused_without_fc1_layout_is_refused(built: Callable[[str], Case], tmp_path: Path) -> None:
    case = built("qwen2.5-legacy-r1.4")
    dst = tmp_path / "megatron"
    r = convert(*case.cli(with_flags=False), "--qkv-layout", "grouped", "--save-dir", str(dst))
    assert r.returncode == USAGE, r.stderr
    assert "--fc1-layout" in r.stderr
    assert not dst.exists()


WRONG = [
    pytest.param("qwen2.5-legacy-r1.4", ("--qkv-layout", "contiguous", "--fc1-layout", "gate-up"), id="legacy"),
    # the r1.7 fixture's YAML says model_parallel 2 = its 2 query groups, and [Q_r;K_r;V_r] with one group per
    # rank is the grouped order itself: claim a TP-1 training so that the wrong order really is another one
    pytest.param("qwen3-r1.7", ("--qkv-layout", "contiguous", "--fc1-layout", "gate-up",
                                "--source-tensor-parallel-size", "1"), id="mcore"),
]


@pytest.mark.parametrize(("family", "wrong"), WRONG)
def test_a_wrong_layout_flag_gives_output_that_differs_from_the_truth(
        built: Callable[[str], Case], tmp_path: Path, family: str, wrong: tuple[str, ...]) -> None:
    """The comparison can fail: the same checkpoint read with the other layout is caught, tensor by tensor."""
    case = built(family)
    dst = tmp_path / "megatron"
    r = convert(*case.cli(with_flags=False), *wrong, "--save-dir", str(dst), "--no-verify")
    assert r.returncode == 0, r.stderr
    problems = check_output(case, dst, 1, 1)
    differ = {p.split(": ")[1].rsplit(".", 1)[0].split(".", 3)[-1] for p in problems if "values differ" in p}
    assert differ == {"self_attention.linear_qkv", "mlp.linear_fc1"}, problems


SOURCE_TP = [
    pytest.param(1, ("--source-tensor-parallel-size", "2"), 1, id="flag-to-tp1"),
    pytest.param(2, (), 2, id="yaml-model-parallel-to-tp2"),
]


@pytest.mark.parametrize(("yaml_mp", "flags", "tp"), SOURCE_TP)
def test_contiguous_layouts_trained_with_source_tp_convert_correctly(
        family_root: Path, tmp_path: Path, yaml_mp: int, flags: tuple[str, ...], tp: int) -> None:
    """r1.3 w_qkv / w_gate_hidden trained at TP 2 hold [Q_r;K_r;V_r] and [G_r;U_r] per source rank r."""
    case = fam_qwen25.build(family_root, "r1.3", source_tp=2, yaml_model_parallel=yaml_mp)
    dst = tmp_path / "megatron"
    r = convert(*case.cli(), *flags, "--save-dir", str(dst), "--tp", str(tp), "--no-verify")
    assert r.returncode == 0, r.stderr
    problems = check_output(case, dst, tp, 1)
    assert not problems, "\n".join(problems[:40])


def test_source_tp_matters(family_root: Path, tmp_path: Path) -> None:
    """Read as if trained at TP 1, the same TP-2 checkpoint gives other qkv and fc1 rows: the flag is needed."""
    case = fam_qwen25.build(family_root, "r1.3", source_tp=2, yaml_model_parallel=1)
    dst = tmp_path / "megatron"
    r = convert(*case.cli(), "--source-tensor-parallel-size", "1", "--save-dir", str(dst), "--no-verify")
    assert r.returncode == 0, r.stderr
    assert any("linear_qkv.weight: values differ" in p for p in check_output(case, dst, 1, 1))


def _defaulted(result: Path, save_dir: Path) -> set[str]:
    """The `defaulted` list of the result file, checked to be the manifest's."""
    res, manifest = read_json(result), read_json(save_dir / "ms2mg-manifest.json")
    assert isinstance(res.get("defaulted"), list), res
    assert sorted(manifest.get("defaulted", [])) == sorted(res["defaulted"])
    return set(res["defaulted"])


def test_facts_no_yaml_and_no_flag_state_are_reported_as_defaulted(family_root: Path, tmp_path: Path) -> None:
    case = fam_llama3.build(family_root, "llama3-noyaml", yaml=False)
    dst, result = tmp_path / "megatron", tmp_path / "result.json"
    r = convert(*case.cli(), "--num-attention-heads", "8", "--save-dir", str(dst), "--result-file", str(result),
                "--no-verify")
    assert r.returncode == 0, r.stderr
    assert {"rotary_base", "norm_epsilon", "max_position_embeddings"} <= _defaulted(result, dst)
    assert not check_output(case, dst, 1, 1)


def test_a_yaml_without_rope_base_reports_only_the_rope_base(family_root: Path, tmp_path: Path) -> None:
    case = fam_llama3.build(family_root, "llama3-notheta", theta=False)
    dst, result = tmp_path / "megatron", tmp_path / "result.json"
    r = convert(*case.cli(), "--save-dir", str(dst), "--result-file", str(result), "--no-verify")
    assert r.returncode == 0, r.stderr
    defaulted = _defaulted(result, dst)
    assert "rotary_base" in defaulted and "norm_epsilon" not in defaulted, defaulted
    args = load_rank_files(dst)["mp_rank_00"]["args"]
    assert (args.rotary_base, args.norm_epsilon) == (10000, 1.0e-5)


FACT_FLAGS = ("--rotary-base", "500000", "--rotary-percent", "1.0", "--no-rotary-interleaved",
              "--norm-epsilon", "1e-5", "--max-position-embeddings", "8192")


def test_flags_state_the_facts_the_tensors_cannot_tell(family_root: Path, tmp_path: Path) -> None:
    case = fam_llama3.build(family_root, "llama3-flags", yaml=False)
    dst, result = tmp_path / "megatron", tmp_path / "result.json"
    r = convert(*case.cli(), "--num-attention-heads", "8", *FACT_FLAGS, "--save-dir", str(dst),
                "--result-file", str(result), "--no-verify")
    assert r.returncode == 0, r.stderr
    stated = {"rotary_base", "rotary_percent", "rotary_interleaved", "norm_epsilon", "max_position_embeddings"}
    assert not stated & _defaulted(result, dst)
    args = load_rank_files(dst)["mp_rank_00"]["args"]
    assert (args.rotary_base, args.rotary_percent, args.rotary_interleaved, args.norm_epsilon,
            args.max_position_embeddings) == (500000, 1.0, False, 1.0e-5, 8192)


def test_glm4_rope_ratio_scales_the_rotary_base(family_root: Path, tmp_path: Path) -> None:
    """glm2_modules.py: base = 10000 * rope_ratio. Beyond the issue's spellings; what a GLM-4 user expects."""
    case = fam_glm4.build(family_root, rope_ratio=4)
    dst = tmp_path / "megatron"
    r = convert(*case.cli(), "--save-dir", str(dst), "--no-verify")
    assert r.returncode == 0, r.stderr
    problems = check_output(case, dst, 1, 1)
    assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_state_is_dropped_and_listed(family_root: Path, tmp_path: Path, optimizer: str) -> None:
    """Issue item 8: every MindFormers optimizer's state keys are dropped and listed, never converted."""
    case = fam_llama3.build(family_root, f"llama3-{optimizer}", optimizer=optimizer)
    dst = tmp_path / "megatron"
    r = convert(*case.cli(), "--save-dir", str(dst), "--no-verify")
    assert r.returncode == 0, r.stderr
    assert set(read_json(dst / "ms2mg-manifest.json")["dropped_keys"]) == case.dropped
    assert not check_output(case, dst, 1, 1)
