"""`ms2mg demo`: build a small MindFormers checkpoint, convert it to TP2/PP2, verify it, say what happened.

The sample is a 4-layer GQA model with SwiGLU, RMSNorm and biases on every linear layer, stored as
MindFormers r1.7+ would store it (mcore names, interleaved SwiGLU fc1), with optimizer state mixed in and
a MindFormers YAML beside it. No network, no cluster, about 12 MB.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ms2mg_converter import __version__
from ms2mg_converter.errors import VerificationError
from ms2mg_converter.result import ConversionResult

log = logging.getLogger("ms2mg")

DEMO_YAML = """\
# MindFormers model description (the part ms2mg reads)
model:
  model_config:
    num_layers: 4
    hidden_size: 128
    ffn_hidden_size: 352
    num_attention_heads: 8
    num_query_groups: 2
    vocab_size: 2000
    seq_length: 512
    add_bias_linear: True
    use_contiguous_weight_layout_attention: False
    use_interleaved_weight_layout_mlp: True
"""


def _build(src: Path) -> None:
    from ms2mg_converter.demo.sample import SampleSpec, build_sample

    spec = SampleSpec(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=8,
                      num_query_groups=2, vocab_size=2000, bias="all", fc1_layout="interleaved",
                      qkv_layout="grouped", extra_keys=True, seed=2026)
    build_sample(spec, src)
    (src / "model.yaml").write_text(DEMO_YAML, encoding="utf-8")


def _tree(root: Path) -> list[str]:
    return [f"  {p.relative_to(root)}  ({p.stat().st_size:,} bytes)" for p in sorted(root.rglob("*")) if p.is_file()]


def run_demo(workdir: Path | None, cli_main: Callable[[Sequence[str]], int]) -> ConversionResult:
    """Build the sample, then convert and verify it through `cli_main` (the `ms2mg` command line itself)."""
    keep = workdir is not None
    base = workdir or Path(tempfile.mkdtemp(prefix="ms2mg-demo-"))
    src, dst = base / "mindformers-sample", base / "megatron-tp2-pp2"
    try:
        if src.exists():
            shutil.rmtree(src)
        _build(src)
        log.info("built a sample MindFormers checkpoint in %s:\n%s", src, "\n".join(_tree(src)))
        argv = ["convert", "--load-dir", str(src), "--save-dir", str(dst), "--config", str(src / "model.yaml"),
                "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                "--true-vocab-size", "1997", "--progress", "none", "--overwrite"]
        log.info("running: ms2mg %s", " ".join(argv))
        if cli_main(argv) != 0:
            raise VerificationError("the demo conversion failed (see the message above)")
        log.info("wrote the Megatron-LM checkpoint (TP2 x PP2, bf16) to %s:\n%s", dst, "\n".join(_tree(dst)))
        log.info("running: ms2mg verify --load-dir %s --save-dir %s", src, dst)
        if cli_main(["verify", "--load-dir", str(src), "--save-dir", str(dst)]) != 0:
            raise VerificationError("the demo checkpoint did not verify (see above)")
        where = f"kept in {base}" if keep else "in a temporary directory, now removed (use --workdir DIR to keep)"
        log.info("demo done: the output loads with torch.load(weights_only=True) and matches the source; files %s",
                 where)
        return ConversionResult(status="Succeeded", reason="Demo", message=f"demo output {where}",
                                converter_version=__version__, verified=True)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
