"""The converted checkpoint is what Megatron really loads and computes (issue 2, "Proof").

Sample MindFormers checkpoints (`ms2mg_converter.demo.sample`) are converted with the real command line
(`ms2mg convert`, a subprocess), then consumed by megatron-core 0.16.1 on CPU (`megatron_consumer`):

* every rank file of TP∈{1,2,4} × PP∈{1,2,4} loads `strict=True` into the GPTModel of its rank;
* the logits of the converted model equal a plain-torch forward of the *logical* weights
  (`reference_model`, independent of any fused layout) within 1e-5 in fp32, at TP1 (PP1 and PP2 chained in
  one process) and at TP2/PP2 with four real gloo processes;
* converting with a wrong `--qkv-layout` / `--fc1-layout` still loads (same shapes) but gives logits that
  are far off: the check catches silent layout bugs;
* bf16 (the default `--dtype`) gives logits close to the reference, with the same argmax almost everywhere.

`test_harness_*` validate the harness itself with a test-only sharder written from target-format.md
(`_mini_sharder`), independent of the converter.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ms2mg_converter.demo.sample import SampleSpec, build_sample, logical_weights

if __package__:
    from . import _mini_sharder
    from . import megatron_consumer as mc
    from . import reference_model as ref
else:
    import _mini_sharder
    import megatron_consumer as mc
    import reference_model as ref

pytestmark = pytest.mark.consumer

FP32_ATOL = 1e-5
WRONG_LAYOUT_MIN_DIFF = 0.5  # logits have std ~1; a wrong layout moves them by several units

SPECS: dict[str, SampleSpec] = {
    "gqa": SampleSpec(),
    "mha-bias-all-tied": SampleSpec(num_query_groups=8, bias="all", tied=True),
    "qwen2-qkv-bias": SampleSpec(bias="qkv"),
    "qwen3-qk-norm-kv16": SampleSpec(qk_layernorm=True, kv_channels=16),
    "layernorm-learned-gelu-tied": SampleSpec(normalization="LayerNorm", swiglu=False, bias="all", tied=True,
                                              position_embedding_type="learned_absolute"),
    "mf-contiguous-qkv-interleaved-fc1": SampleSpec(qkv_layout="contiguous", fc1_layout="interleaved",
                                                    bias="all"),
    "legacy-separate": SampleSpec(names="legacy", bias="qkv", extra_keys=True, files=3, index_json=True),
    "legacy-fused": SampleSpec(names="legacy", legacy_fused=True, tied=True, bias="qkv"),
}
EXTRA_FLAGS: dict[str, list[str]] = {"gqa": ["--true-vocab-size", "1000"]}
FULL_GRID = ("gqa", "mha-bias-all-tied", "qwen3-qk-norm-kv16")
GRID = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2, 4)]
LOAD_CASES = [(n, tp, pp) for n in SPECS for tp, pp in (GRID if n in FULL_GRID else [(1, 1), (2, 2)])]

INPUT_IDS = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1234))


def _ms2mg() -> list[str]:
    script = Path(sys.executable).with_name("ms2mg")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ms2mg_converter"]


def convert_flags(spec: SampleSpec, tp: int, pp: int, *, dtype: str | None = "fp32",
                  qkv_layout: str | None = None, fc1_layout: str | None = None) -> list[str]:
    """`ms2mg convert` flags for a sample (without --load-dir/--save-dir)."""
    flags = ["--tp", str(tp), "--pp", str(pp), "--num-attention-heads", str(spec.num_attention_heads),
             "--num-query-groups", str(spec.num_query_groups), "--no-final-norm-extra-state",
             "--normalization", spec.normalization, "--position-embedding-type", spec.position_embedding_type]
    if dtype is not None:
        flags += ["--dtype", dtype]
    if spec.kv_channels is not None:
        flags += ["--kv-channels", str(spec.kv_channels)]
    if spec.names == "mcore" or spec.legacy_fused:
        flags += ["--qkv-layout", qkv_layout or spec.qkv_layout,
                  "--fc1-layout", fc1_layout or spec.fc1_layout, "--source-tensor-parallel-size", "1"]
    if spec.position_embedding_type == "learned_absolute":
        flags += ["--max-position-embeddings", str(spec.max_position_embeddings),
                  "--seq-length", str(spec.max_position_embeddings)]
    return flags


def run_convert(src: Path, dst: Path, flags: list[str]) -> Path:
    cmd = [*_ms2mg(), "convert", "--load-dir", str(src), "--save-dir", str(dst), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(f"ms2mg convert failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return dst


class Samples:
    """Sample sources and their conversions, made once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._sources: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}
        self._converted: dict[tuple[str, ...], Path] = {}

    def source(self, name: str, spec: SampleSpec | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
        if name not in self._sources:
            src = self.root / "src" / name
            self._sources[name] = (src, build_sample(spec or SPECS[name], src))
        return self._sources[name]

    def converted(self, name: str, tp: int, pp: int, spec: SampleSpec | None = None,
                  extra: tuple[str, ...] = (), **kw: str | None) -> Path:
        spec = spec or SPECS[name]
        flags = convert_flags(spec, tp, pp, **kw) + EXTRA_FLAGS.get(name, []) + list(extra)
        key = (name, *flags)
        if key not in self._converted:
            src, _ = self.source(name, spec)
            dst = self.root / "dst" / f"{name}-{len(self._converted)}"
            self._converted[key] = run_convert(src, dst, flags)
        return self._converted[key]

    def reference(self, name: str, spec: SampleSpec | None = None) -> torch.Tensor:
        spec = spec or SPECS[name]
        return ref.reference_logits(ref.rounded(self.source(name, spec)[1], spec), spec, INPUT_IDS)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    return Samples(tmp_path_factory.mktemp("consumer"))


def assert_matches_reference(logits: torch.Tensor, reference: torch.Tensor, atol: float = FP32_ATOL) -> None:
    vocab = reference.shape[-1]
    assert logits.shape[:-1] == reference.shape[:-1], logits.shape
    assert logits.shape[-1] >= vocab, logits.shape
    diff = (logits[..., :vocab] - reference).abs().max().item()
    assert diff <= atol, f"max |logit - reference| = {diff:.3g} > {atol}"
    if logits.shape[-1] > vocab:  # padded rows replicate the last real row (Megatron's saver)
        pad = (logits[..., vocab:] - logits[..., vocab - 1:vocab]).abs().max().item()
        assert pad == 0.0, f"padded vocab logits differ from the last real row's by {pad:.3g}"


# ------------------------------------------------------------------------------------ the real converter

@pytest.mark.parametrize(("name", "tp", "pp"), LOAD_CASES, ids=[f"{n}-tp{t}pp{p}" for n, t, p in LOAD_CASES])
def test_every_rank_file_loads_strict(samples: Samples, name: str, tp: int, pp: int) -> None:
    ckpt = mc.open_checkpoint(samples.converted(name, tp, pp))
    assert (ckpt.tp, ckpt.pp) == (tp, pp)
    models = mc.load_all_ranks_strict(ckpt)
    assert len(models) == tp * pp
    spec = SPECS[name]
    emb = ckpt.load_rank(0, 0)["model"]["embedding.word_embeddings.weight"]
    assert emb.shape == (ckpt.args.padded_vocab_size // tp, spec.hidden_size)
    assert ckpt.args.padded_vocab_size % tp == 0
    assert ckpt.args.padded_vocab_size >= spec.vocab_size


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("name", list(SPECS))
def test_logits_tp1_match_reference(samples: Samples, name: str, pp: int) -> None:
    logits = mc.logits_in_process(mc.open_checkpoint(samples.converted(name, 1, pp)), INPUT_IDS)
    assert_matches_reference(logits, samples.reference(name))


@pytest.fixture(scope="module")
def tp2pp2_logits(samples: Samples) -> dict[str, tuple[torch.Tensor, float]]:
    dirs = [samples.converted(name, 2, 2) for name in SPECS]
    start = time.monotonic()
    logits = mc.logits_multiprocess(dirs, INPUT_IDS)
    seconds = time.monotonic() - start
    return {name: (lg, seconds) for name, lg in zip(SPECS, logits, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_logits_tp2_pp2_gloo_match_reference(samples: Samples, tp2pp2_logits: dict[str, tuple[torch.Tensor,
                                                                                               float]],
                                             name: str) -> None:
    logits, _ = tp2pp2_logits[name]
    assert_matches_reference(logits, samples.reference(name))


WRONG_LAYOUTS = [("qkv", {"qkv_layout": "grouped"}), ("fc1", {"fc1_layout": "gate-up"})]


@pytest.mark.parametrize(("what", "wrong"), WRONG_LAYOUTS, ids=[w for w, _ in WRONG_LAYOUTS])
def test_wrong_source_layout_gives_wrong_logits(samples: Samples, what: str, wrong: dict[str, str]) -> None:
    """The checkpoint is contiguous-QKV + interleaved-fc1; claim one of them is Megatron's layout."""
    name = "mf-contiguous-qkv-interleaved-fc1"
    ckpt = mc.open_checkpoint(samples.converted(name, 1, 1, **wrong))
    logits = mc.logits_in_process(ckpt, INPUT_IDS)  # loads strict: the shapes are the same
    reference = samples.reference(name)
    diff = (logits[..., :reference.shape[-1]] - reference).abs().max().item()
    assert diff > WRONG_LAYOUT_MIN_DIFF, f"wrong {what} layout changed the logits by only {diff:.3g}"


def test_bf16_default_dtype_close_to_reference(samples: Samples) -> None:
    spec = SampleSpec(dtype="bf16", bias="all")
    ckpt = mc.open_checkpoint(samples.converted("gqa-bf16", 1, 1, spec=spec, dtype=None))
    assert ckpt.args.bf16
    assert not ckpt.args.fp16
    logits = mc.logits_in_process(ckpt, INPUT_IDS)
    reference = samples.reference("gqa-bf16", spec)
    diff = (logits[..., :spec.vocab_size] - reference).abs().max().item()
    agree = (logits[..., :spec.vocab_size].argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert diff < 0.25, f"bf16 max |logit - reference| = {diff:.3g}"
    assert agree >= 0.9, f"bf16 argmax agrees on only {agree:.0%} of tokens"


# ------------------------------------------------------------------------- harness self-test (no CLI)

HARNESS_SPECS = ("gqa", "mha-bias-all-tied", "qwen3-qk-norm-kv16", "layernorm-learned-gelu-tied")


def _harness_ckpt(tmp: Path, name: str, tp: int, pp: int, qkv_layout: str = "grouped") -> Path:
    spec = SPECS[name]
    return _mini_sharder.shard(logical_weights(spec), spec, tmp / f"{name}-{tp}-{pp}-{qkv_layout}", tp, pp,
                               qkv_layout=qkv_layout)


def _reference(name: str) -> torch.Tensor:
    spec = SPECS[name]
    return ref.reference_logits(logical_weights(spec), spec, INPUT_IDS)


@pytest.mark.parametrize("name", HARNESS_SPECS)
def test_harness_mini_sharder_agrees_with_reference(tmp_path: Path, name: str) -> None:
    for tp, pp in GRID:
        mc.load_all_ranks_strict(mc.open_checkpoint(_harness_ckpt(tmp_path, name, tp, pp)))
    for pp in (1, 2, 4):
        logits = mc.logits_in_process(mc.open_checkpoint(_harness_ckpt(tmp_path, name, 1, pp)), INPUT_IDS)
        assert_matches_reference(logits, _reference(name))
    wrong = mc.logits_in_process(mc.open_checkpoint(_harness_ckpt(tmp_path, name, 1, 1, "contiguous")),
                                 INPUT_IDS)
    diff = (wrong[..., :1000] - _reference(name)).abs().max().item()
    assert diff > WRONG_LAYOUT_MIN_DIFF, f"a [Q;K;V] concat changed the logits by only {diff:.3g}"


@pytest.mark.slow
def test_harness_tp2_pp2_gloo_agrees_with_reference(tmp_path: Path) -> None:
    dirs = [_harness_ckpt(tmp_path, name, 2, 2) for name in HARNESS_SPECS]
    for name, logits in zip(HARNESS_SPECS, mc.logits_multiprocess(dirs, INPUT_IDS), strict=True):
        assert_matches_reference(logits, _reference(name))
