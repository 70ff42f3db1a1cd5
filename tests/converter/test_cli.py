"""The command line as a user meets it: pasted reference command, exit codes, result file, progress, safety."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ms2mg_converter.demo.sample import SampleSpec, build_sample, logical_weights, mindformers_tensors
from ms2mg_converter.verify.ckptfile import peek
from tests.converter.conftest import run_cli, sample_flags


@pytest.fixture
def sample(make_sample) -> tuple[Path, SampleSpec]:
    src, spec, _ = make_sample(bias="all", fc1_layout="interleaved")
    return src, spec


def test_reference_command_pasted_verbatim(sample, tmp_path):
    src, _ = sample
    dst = tmp_path / "megatron"
    r = run_cli("convert", "--megatron-path", "path_to_megatron", "--model-type", "GPT", "--loader", "core_mf",
                "--saver", "core", "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                "--load-dir", str(src), "--save-dir", str(dst), "--loader-transformer-impl", "local",
                "--saver-transformer-impl", "local", "--position-embedding-type", "rope", "--true-vocab-size",
                "1000", "--padded-vocab-size", "1000", "--num-layers", "4", "--seq-length", "2048", "--hidden-size",
                "64", "--ffn-hidden-size", "128", "--num-attention-heads", "8", "--num-query-groups", "4",
                "--normalization", "RMSNorm", "--add-bias-linear", "--swiglu",
                "--ms2torch-ckpt-path", str(tmp_path / "ms2pt"), "--fc1-layout", "interleaved",
                "--qkv-layout", "grouped")
    assert r.returncode == 0, r.stderr
    assert "--ms2torch-ckpt-path: ms2mg writes no intermediate copy" in r.stderr
    assert "--megatron-path: ms2mg needs no Megatron-LM checkout" in r.stderr
    assert not (tmp_path / "ms2pt").exists()
    assert sorted(p.name for p in (dst / "iter_0000001").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "1"
    manifest = json.loads((dst / "ms2mg-manifest.json").read_text())
    assert manifest["verified"] is True and len(manifest["files"]) == 4
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])


def test_result_file_and_progress_json_on_success(sample, tmp_path):
    src, spec = sample
    result = tmp_path / "result.json"
    r = run_cli("convert", "--load-dir", str(src), "--save-dir", str(tmp_path / "o"), *sample_flags(spec),
                "--tp", "2", "--pp", "2", "--true-vocab-size", "1000", "--progress", "json",
                "--result-file", str(result))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[-1]["done"] == lines[-1]["total"] == 12 and lines[-1]["bytes"] > 0
    assert [x["done"] for x in lines] == list(range(1, 13))
    res = json.loads(result.read_text())
    assert res["status"] == "Succeeded" and res["exitCode"] == 0 and res["verified"] is True
    assert res["paddedVocabSize"] == 1024 and res["bytes"] > 0 and res["manifestPath"].endswith("ms2mg-manifest.json")


def _run_with_stdout_closed(*args: str) -> int:
    """Run the CLI with its stdout a pipe whose reader has gone (as in `ms2mg ... | head -1`)."""
    proc = subprocess.Popen([sys.executable, "-m", "ms2mg_converter", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.close()
    return proc.wait(timeout=300)


def test_a_closed_stdout_does_not_fail_the_work(sample, tmp_path):
    src, spec = sample
    dst, result = tmp_path / "o", tmp_path / "result.json"
    flags = [*sample_flags(spec), "--tp", "2", "--pp", "2", "--true-vocab-size", "1000"]
    assert _run_with_stdout_closed("convert", "--load-dir", str(src), "--save-dir", str(dst), *flags,
                                   "--progress", "json", "--result-file", str(result)) == 0
    assert json.loads(result.read_text())["status"] == "Succeeded" and (dst / "ms2mg-manifest.json").is_file()
    assert _run_with_stdout_closed("verify", "--load-dir", str(src), "--save-dir", str(dst)) == 0
    assert _run_with_stdout_closed("inspect", "--load-dir", str(src), *flags) == 0


@pytest.mark.parametrize(("extra", "code", "reason"), [
    (["--tp", "3"], 2, "ParallelismMismatch"),
    (["--num-layers", "7"], 3, "ShapeMismatch"),
    (["--model-type", "BERT"], 2, "InvalidArguments"),
])
def test_failures_exit_codes_and_nothing_left(sample, tmp_path, extra, code, reason):
    src, spec = sample
    dst, result = tmp_path / "o", tmp_path / "result.json"
    r = run_cli("convert", "--load-dir", str(src), "--save-dir", str(dst), *sample_flags(spec),
                "--true-vocab-size", "1000", "--result-file", str(result), *extra)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("ms2mg: ")
    assert json.loads(result.read_text())["reason"] == reason
    assert not dst.exists()
    assert not list(tmp_path.glob(".o.ms2mg-staging-*"))


def test_missing_heads_is_a_usage_error(sample, tmp_path):
    src, _ = sample
    r = run_cli("convert", "--load-dir", str(src), "--save-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "--num-attention-heads" in r.stderr


def test_destination_rules(sample, tmp_path):
    src, spec = sample
    dst = tmp_path / "o"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    args = ["convert", "--load-dir", str(src), "--save-dir", str(dst), *sample_flags(spec)]
    r = run_cli(*args)
    assert r.returncode == 4 and "not empty" in r.stderr
    r = run_cli(*args, "--overwrite")
    assert r.returncode == 4 and "was not written by ms2mg" in r.stderr
    assert (dst / "notes.txt").read_text() == "mine"
    (dst / "notes.txt").unlink()
    assert run_cli(*args).returncode == 0  # an empty directory is fine
    first = json.loads((dst / "ms2mg-manifest.json").read_text())["created"]
    again = run_cli(*args, "--result-file", str(tmp_path / "again.json"))  # a retried Job: same request
    assert again.returncode == 0 and "already holds this exact conversion" in again.stderr
    assert json.loads((tmp_path / "again.json").read_text())["reason"] == "AlreadyConverted"
    assert json.loads((dst / "ms2mg-manifest.json").read_text())["created"] == first
    assert run_cli(*args, "--tp", "2").returncode == 4  # a different request needs --overwrite
    r = run_cli(*args, "--overwrite", "--tp", "2")
    assert r.returncode == 0, r.stderr
    assert (dst / "iter_0000001" / "mp_rank_01").is_dir() and not (dst / "iter_0000001" / "mp_rank_00" / "x").exists()
    assert json.loads((dst / "ms2mg-manifest.json").read_text())["created"] >= first
    assert not list(tmp_path.glob(".o.ms2mg-*"))
    r = run_cli("convert", "--load-dir", str(src), "--save-dir", str(src), *sample_flags(spec))
    assert r.returncode == 2 and "contains the source" in r.stderr


def test_inspect_writes_nothing(sample, tmp_path):
    src, spec = sample
    r = run_cli("inspect", "--load-dir", str(src), *sample_flags(spec), "--tp", "2", "--pp", "2")
    assert r.returncode == 0, r.stderr
    assert "mp_rank_01_001/model_optim_rng.pt" in r.stdout and "peak memory estimate" in r.stdout
    assert "fc1_layout: interleaved" in r.stdout
    r = run_cli("inspect", "--load-dir", str(src), *sample_flags(spec), "--json")
    plan = json.loads(r.stdout)
    assert plan["architecture"]["num_layers"] == 4 and len(plan["files"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src1"]


def test_verify_finds_a_flipped_byte(sample, tmp_path):
    src, spec = sample
    dst = tmp_path / "o"
    assert run_cli("convert", "--load-dir", str(src), "--save-dir", str(dst), *sample_flags(spec), "--tp", "2",
                   "--true-vocab-size", "1000").returncode == 0
    r = run_cli("verify", "--load-dir", str(src), "--save-dir", str(dst))
    assert r.returncode == 0 and "OK: 2 file(s)" in r.stdout, r.stderr
    path = dst / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    rf = peek(path)
    stored = rf.content["model"]["decoder.layers.2.mlp.linear_fc1.weight"]
    start, _ = rf.data_offsets[f"{rf.prefix}/{stored.record}"]
    raw = bytearray(path.read_bytes())
    raw[start + 10] ^= 0x40
    path.write_bytes(bytes(raw))
    r = run_cli("verify", "--load-dir", str(src), "--save-dir", str(dst))
    assert r.returncode == 5
    assert "MISMATCH" in r.stdout and "decoder.layers.2.mlp.linear_fc1.weight" in r.stdout
    assert "sha256 differs" in r.stdout


def test_verify_flags_a_file_the_manifest_does_not_list(sample, tmp_path):
    src, spec = sample
    dst = tmp_path / "o"
    assert run_cli("convert", "--load-dir", str(src), "--save-dir", str(dst), *sample_flags(spec), "--tp", "2",
                   "--true-vocab-size", "1000").returncode == 0
    manifest_path = dst / "ms2mg-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "iter_0000001/mp_rank_01/model_optim_rng.pt"]
    manifest_path.write_text(json.dumps(manifest))
    r = run_cli("verify", "--load-dir", str(src), "--save-dir", str(dst))
    assert r.returncode == 5, r.stderr
    assert "iter_0000001/mp_rank_01/model_optim_rng.pt: not in the manifest" in r.stdout


def test_nonfinite_weights_refused_unless_allowed(tmp_path):
    spec = SampleSpec()
    tensors = mindformers_tensors(spec, logical_weights(spec))
    tensors["decoder.layers.1.mlp.linear_fc2.weight"][3, 5] = float("nan")
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"))
    args = ["convert", "--load-dir", str(src), *sample_flags(spec)]
    r = run_cli(*args, "--save-dir", str(tmp_path / "a"))
    assert r.returncode == 3 and "decoder.layers.1.mlp.linear_fc2.weight" in r.stderr and "NaN" in r.stderr
    assert not (tmp_path / "a").exists()
    r = run_cli(*args, "--save-dir", str(tmp_path / "b"), "--allow-nonfinite")
    assert r.returncode == 0, r.stderr
    out = torch.load(tmp_path / "b/iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert torch.isnan(out["model"]["decoder.layers.1.mlp.linear_fc2.weight"][3, 5])


def test_demo_runs():
    r = run_cli("demo")
    assert r.returncode == 0, r.stderr
    assert "demo done" in r.stderr and "OK: 4 file(s)" in r.stdout


def _flip_one_weight(path: Path) -> None:
    """Change one bit of one value in the middle of the data section (sizes and header unchanged)."""
    data = bytearray(path.read_bytes())
    pos = len(data) - len(data) // 3
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("digest", ["crc32", "sha256"])
def test_rerun_is_decided_by_content_not_by_sizes(tmp_path, digest):
    """A new checkpoint at the same path with the same sizes and headers is not "already converted"."""
    spec = SampleSpec(bias="all", fc1_layout="interleaved")
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_sample(spec, src)
    args = ["convert", "--load-dir", str(src), "--save-dir", str(dst), *sample_flags(spec), "--source-digest", digest]
    assert run_cli(*args).returncode == 0
    files = json.loads((dst / "ms2mg-manifest.json").read_text())["source"]["files"]
    assert [f["digest"].split(":")[0] for f in files] == [digest] and all(len(f["header_sha256"]) == 64 for f in files)
    again = run_cli(*args, "--result-file", str(tmp_path / "same.json"))
    assert again.returncode == 0 and json.loads((tmp_path / "same.json").read_text())["reason"] == "AlreadyConverted"

    header_before = (src / "model.safetensors").read_bytes()[:4096]
    build_sample(SampleSpec(bias="all", fc1_layout="interleaved", seed=1), src)  # retrained: same names and shapes
    assert (src / "model.safetensors").read_bytes()[:4096] == header_before
    changed = run_cli(*args)
    assert changed.returncode == 4 and "not empty" in changed.stderr, changed.stderr
    assert run_cli(*args, "--overwrite").returncode == 0

    _flip_one_weight(src / "model.safetensors")  # one bit of one value
    flipped = run_cli(*args, "--result-file", str(tmp_path / "flipped.json"))
    assert flipped.returncode == 4, flipped.stderr
    assert json.loads((tmp_path / "flipped.json").read_text())["reason"] != "AlreadyConverted"


def test_a_manifest_with_another_digest_kind_is_not_a_match(tmp_path):
    spec = SampleSpec(bias="all", fc1_layout="interleaved")
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_sample(spec, src)
    base = ["convert", "--load-dir", str(src), "--save-dir", str(dst), *sample_flags(spec)]
    assert run_cli(*base, "--source-digest", "crc32").returncode == 0
    assert run_cli(*base, "--source-digest", "sha256").returncode == 4
