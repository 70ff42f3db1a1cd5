"""Command-line flags of `ms2mg` and their translation into a `ConvertConfig`.

`ms2mg convert` accepts the flags of the MindSpore docs' reference command verbatim
(`tools/checkpoint/convert.py --loader core_mf --saver core ...`), so that command can be pasted. Flags
that only steer the reference pipeline's machinery are accepted and explained (see `REFERENCE_ONLY`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ms2mg_converter.cli.moeargs import add_moe_flags, moe_config
from ms2mg_converter.config import (
    CkptFormat,
    ConvertConfig,
    DType,
    Fc1Layout,
    LayoutConfig,
    ModelOverrides,
    Normalization,
    PadFill,
    PipelineLayout,
    PositionEmbedding,
    QkvLayout,
    SourceDigest,
    TransformerImpl,
    VocabConfig,
)
from ms2mg_converter.errors import UsageError

REFERENCE_ONLY: dict[str, str] = {
    "model_type": "only GPT-style models are converted; the value is checked to be GPT",
    "loader": "ms2mg reads MindFormers safetensors itself (the reference needs loader_core_mf.py)",
    "saver": "ms2mg writes the Megatron-LM 'torch' checkpoint format itself (the reference's saver core)",
    "megatron_path": "ms2mg needs no Megatron-LM checkout",
    "ms2torch_ckpt_path": "ms2mg writes no intermediate copy; the checkpoint goes to --save-dir only",
    "loader_transformer_impl": "MindFormers names are local-spec names; nothing to choose on the loading side",
    "max_queue_size": "ms2mg streams tensors in one process; there is no queue",
}


def _add_io(p: argparse.ArgumentParser, *, save: bool) -> None:
    g = p.add_argument_group("source and destination")
    g.add_argument("--load-dir", required=True, type=Path, metavar="PATH",
                   help="MindFormers checkpoint: a .safetensors file, a directory of *.safetensors, or a "
                        "directory with model.safetensors.index.json, or a distributed checkpoint's directory of "
                        "rank_N/ directories")
    g.add_argument("--src-strategy", type=Path, metavar="PATH", default=None,
                   help="distributed source: the MindSpore strategy file (ckpt_strategy_rank_N.ckpt or .json) or "
                        "the directory of them (default: <load-dir>/strategy or <load-dir>/../strategy)")
    g.add_argument("--src-ckpt-suffix", metavar="TEXT", default=None,
                   help="distributed source: read the file of each rank_N/ that ends in -TEXT.safetensors (e.g. 2_100) "
                        "(default: meta.json's last_ckpt_file, else the highest epoch_step)")
    if save:
        g.add_argument("--save-dir", required=True, type=Path, metavar="DIR",
                       help="Megatron-LM checkpoint directory to create")
    g.add_argument("--load-root", type=Path, metavar="DIR", default=None,
                   help="refuse to read anything that resolves (symlinks included) outside DIR "
                        "(the operator passes the source volume's mount point)")
    if save:
        g.add_argument("--save-root", type=Path, metavar="DIR", default=None,
                       help="refuse to write anything that resolves (symlinks included) outside DIR "
                            "(the operator passes the destination volume's mount point)")
    g.add_argument("--config", dest="config_yaml", type=Path, metavar="YAML",
                   help="MindFormers model YAML: architecture values and layout flags are read from it "
                        "(flags given on the command line win)")


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--target-tensor-parallel-size", "--tp", dest="tp", type=int, default=1, metavar="N",
                   help="tensor-parallel size of the output (default 1)")
    g.add_argument("--target-pipeline-parallel-size", "--pp", dest="pp", type=int, default=1, metavar="N",
                   help="pipeline-parallel size of the output (default 1)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, metavar="N",
                   help="layers on the first pipeline stage (uneven stages; the stages in between share the "
                        "rest evenly; Megatron's flag of the same name)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, metavar="N",
                   help="layers on the last pipeline stage (uneven stages)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, metavar="N",
                   help="virtual pipeline chunks of N layers each (interleaved schedule; rank files hold "
                        "model0, model1, ...); evenly split stages only")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None, metavar="N",
                   help="N virtual pipeline chunks per stage (interleaved schedule); also with uneven stages")


def _bool_flag(g: argparse._ArgumentGroup, name: str, help_text: str) -> None:
    g.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (inferred from the tensors where they can tell; given values are checked)")
    for name, what in (
        ("num-layers", "transformer layers"),
        ("hidden-size", "hidden size"),
        ("ffn-hidden-size", "MLP hidden size (per gate/up half with SwiGLU)"),
        ("num-attention-heads", "attention heads (needed: flag or --config)"),
        ("num-query-groups", "query groups / KV heads (needed with GQA: flag or --config)"),
        ("kv-channels", "head dimension (default hidden/heads)"),
        ("seq-length", "sequence length stored in args (default 2048)"),
        ("max-position-embeddings", "max positions stored in args (default seq-length)"),
        ("padded-vocab-size", "rows of the source embedding table; checked against the tensors"),
    ):
        g.add_argument(f"--{name}", type=int, default=None, metavar="N", help=what)
    g.add_argument("--rotary-base", type=float, default=None, metavar="F",
                   help="RoPE base, theta (default 10000, reported as defaulted)")
    g.add_argument("--rotary-percent", type=float, default=None, metavar="F",
                   help="fraction of the head dim RoPE rotates (default: the family's, else 1.0)")
    _bool_flag(g, "rotary-interleaved", "RoPE on adjacent pairs (GLM) instead of halves (default: the family's, "
                                        "else no)")
    g.add_argument("--norm-epsilon", type=float, default=None, metavar="F",
                   help="norm epsilon (default 1e-5, reported as defaulted)")
    g.add_argument("--normalization", choices=[n.value for n in Normalization], default=None)
    g.add_argument("--position-embedding-type", choices=[e.value for e in PositionEmbedding], default=None)
    _bool_flag(g, "swiglu", "SwiGLU MLP (inferred: fc1 rows = 2 x fc2 columns)")
    _bool_flag(g, "add-bias-linear", "biases on all linear layers (inferred)")
    _bool_flag(g, "qkv-bias", "bias on linear_qkv only, Qwen2 style (inferred)")
    _bool_flag(g, "qk-layernorm", "q/k layernorm, Qwen3 style (inferred)")
    _bool_flag(g, "untie-embeddings-and-output-weights", "separate output layer (inferred)")
    _add_mla(p)


def _add_mla(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-latent attention (MLA, DeepSeek-V2/V3; checked against the tensors)")
    for name, what in (
        ("q-lora-rank", "query compression rank (inferred from linear_q_down_proj / linear_qb)"),
        ("kv-lora-rank", "KV compression rank (inferred from linear_kv_up_proj / linear_kvb)"),
        ("qk-head-dim", "per-head q/k dimension without RoPE (inferred)"),
        ("qk-pos-emb-head-dim", "per-head RoPE dimension (inferred; needed for a fused linear_qkv without "
                                "q compression)"),
        ("v-head-dim", "per-head value dimension (inferred)"),
        ("original-max-position-embeddings", "YaRN: the pre-extension context length (default 4096, reported)"),
    ):
        g.add_argument(f"--{name}", type=int, default=None, metavar="N", help=what)
    g.add_argument("--rope-type", choices=["rope", "yarn"], default=None,
                   help="MLA RoPE: plain or YaRN-scaled (needed for MLA: flag or --config)")
    for name, what in (
        ("rotary-scaling-factor", "YaRN scaling factor (default 40, reported as defaulted)"),
        ("beta-fast", "YaRN beta_fast (default 32, reported)"), ("beta-slow", "YaRN beta_slow (default 1, reported)"),
        ("mscale", "YaRN mscale (default 1.0, reported)"), ("mscale-all-dim", "YaRN mscale_all_dim (default 0, "
                                                                              "reported)"),
    ):
        g.add_argument(f"--{name}", type=float, default=None, metavar="F", help=what)


def _add_vocab_and_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vocabulary, layouts and output")
    g.add_argument("--true-vocab-size", type=int, default=None, metavar="N",
                   help="real vocabulary size: the output table gets Megatron's padded size, a multiple of "
                        "--make-vocab-size-divisible-by x TP (surplus source rows are cut, missing rows filled)")
    g.add_argument("--vocab-file", type=Path, default=None, metavar="JSON",
                   help="tokenizer vocab JSON; its entry count is the true vocab size")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                   help="pad the vocabulary to a multiple of N x TP, as Megatron does (default 128)")
    g.add_argument("--vocab-pad-fill", choices=[f.value for f in PadFill], default=PadFill.LAST_ROW.value,
                   help="padding rows: copies of the last row (Megatron's saver, default) or zeros")
    g.add_argument("--qkv-layout", choices=[q.value for q in QkvLayout], default=None,
                   help="row order of a fused linear_qkv in the source (else from --config)")
    g.add_argument("--source-tensor-parallel-size", dest="source_tp", type=int, default=None, metavar="N",
                   help="tensor-parallel size the source was trained with (else the --config YAML's "
                        "parallel_config.model_parallel): contiguous fused layouts are [Q;K;V] / [gate; up] "
                        "per training rank; needed with --qkv-layout contiguous")
    g.add_argument("--fc1-layout", choices=[f.value for f in Fc1Layout], default=None,
                   help="row order of a fused SwiGLU linear_fc1 in the source (else from --config)")
    g.add_argument("--dtype", choices=[d.value for d in DType], default=DType.BF16.value,
                   help="dtype of the written tensors (default bf16)")
    g.add_argument("--source-digest", choices=[d.value for d in SourceDigest], default=SourceDigest.CRC32.value,
                   help="digest of the source's content recorded in the manifest, by which a rerun is recognised "
                        "as already converted (default crc32; sha256 is cryptographic and slower)")
    g.add_argument("--ckpt-format", choices=[f.value for f in CkptFormat], default=CkptFormat.TORCH.value,
                   help="Megatron-LM checkpoint format of the output (default torch: per-rank "
                        "iter_*/mp_rank_*/model_optim_rng.pt; torch_dist: iter_*/__0_0.distcp + .metadata, "
                        "global tensors that Megatron reshards to any TP/PP on load)")
    g.add_argument("--saver-transformer-impl", choices=[t.value for t in TransformerImpl],
                   default=TransformerImpl.LOCAL.value, help="key names of the output: local or transformer_engine")
    g.add_argument("--final-norm-extra-state", action=argparse.BooleanOptionalAction, default=True,
                   help="write decoder.final_layernorm._extra_state as Megatron with TransformerEngine does "
                        "(use --no-final-norm-extra-state for a consumer without TransformerEngine)")
    g.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", help="stored in args")
    g.add_argument("--ignore-keys", action="append", default=[], metavar="GLOB",
                   help="drop source keys matching GLOB instead of failing on them (repeatable)")
    g.add_argument("--allow-nonfinite", action="store_true", help="convert tensors holding NaN/Inf")


def _add_reference_only(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("accepted for compatibility with the reference command (see --help text)")
    g.add_argument("--model-type", default="GPT", help=REFERENCE_ONLY["model_type"])
    g.add_argument("--loader", default=None, help=REFERENCE_ONLY["loader"])
    g.add_argument("--saver", default=None, help=REFERENCE_ONLY["saver"])
    g.add_argument("--megatron-path", default=None, help=REFERENCE_ONLY["megatron_path"])
    g.add_argument("--ms2torch-ckpt-path", default=None, help=REFERENCE_ONLY["ms2torch_ckpt_path"])
    g.add_argument("--loader-transformer-impl", default=None, help=REFERENCE_ONLY["loader_transformer_impl"])
    g.add_argument("--max-queue-size", type=int, default=None, help=REFERENCE_ONLY["max_queue_size"])


def add_plan_flags(p: argparse.ArgumentParser, *, save: bool) -> None:
    """All flags that describe a conversion (shared by convert, inspect and verify)."""
    _add_io(p, save=save)
    _add_parallel(p)
    add_moe_flags(p)
    _add_model(p)
    _add_vocab_and_output(p)
    _add_reference_only(p)


def _true_vocab(ns: argparse.Namespace) -> int | None:
    if ns.vocab_file is None:
        return ns.true_vocab_size  # type: ignore[no-any-return]
    try:
        count = len(json.loads(Path(ns.vocab_file).read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise UsageError(f"--vocab-file {ns.vocab_file}: cannot read a JSON vocabulary ({e}).") from e
    if ns.true_vocab_size is not None and ns.true_vocab_size != count:
        raise UsageError(f"--true-vocab-size {ns.true_vocab_size} contradicts --vocab-file {ns.vocab_file}, "
                         f"which holds {count} entries. Give one of them, or make them agree.")
    return count


def _model_overrides(ns: argparse.Namespace) -> ModelOverrides:
    names = ModelOverrides.model_fields.keys()
    return ModelOverrides(**{n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None})


def reference_notes(ns: argparse.Namespace) -> list[str]:
    """One note per reference-only flag the user gave, saying what ms2mg does instead."""
    notes = [f"--{k.replace('_', '-')}: {v}" for k, v in REFERENCE_ONLY.items()
             if k != "model_type" and getattr(ns, k, None) is not None]
    if str(ns.model_type).upper() != "GPT":
        raise UsageError(f"--model-type {ns.model_type}: only GPT-style models (SelfAttention + MLP) are "
                         "supported, as in the reference pipeline.")
    return notes


def to_config(ns: argparse.Namespace) -> ConvertConfig:
    """Translate parsed flags into a validated `ConvertConfig` (raises `UsageError`)."""
    from pydantic import ValidationError

    try:
        return ConvertConfig(
            load_dir=ns.load_dir,
            save_dir=getattr(ns, "save_dir", None),
            tensor_parallel=ns.tp,
            pipeline_parallel=ns.pp,
            pipeline_layout=PipelineLayout(**{n: getattr(ns, n) for n in PipelineLayout.model_fields}),
            model=_model_overrides(ns),
            vocab=VocabConfig(true_vocab_size=_true_vocab(ns),
                              make_vocab_size_divisible_by=ns.make_vocab_size_divisible_by,
                              pad_fill=PadFill(ns.vocab_pad_fill)),
            layouts=LayoutConfig(qkv=ns.qkv_layout, fc1=ns.fc1_layout, source_tensor_parallel=ns.source_tp),
            moe=moe_config(ns),
            dtype=DType(ns.dtype),
            ckpt_format=CkptFormat(ns.ckpt_format),
            source_digest=SourceDigest(getattr(ns, "source_digest", SourceDigest.CRC32.value)),
            transformer_impl=TransformerImpl(ns.saver_transformer_impl),
            final_norm_extra_state=ns.final_norm_extra_state,
            tokenizer_type=ns.tokenizer_type,
            ignore_keys=tuple(ns.ignore_keys),
            allow_nonfinite=ns.allow_nonfinite,
            overwrite=getattr(ns, "overwrite", False),
            verify=not getattr(ns, "no_verify", False),
            config_yaml=ns.config_yaml,
            load_root=ns.load_root,
            src_strategy=ns.src_strategy,
            src_ckpt_suffix=ns.src_ckpt_suffix,
            save_root=getattr(ns, "save_root", None),
        )
    except ValidationError as e:
        problems = "; ".join(f"{_flag_of(err['loc'])}: {err['msg']}" for err in e.errors())
        raise UsageError(f"invalid flags: {problems}.") from e


def _flag_of(loc: tuple[int | str, ...]) -> str:
    """The flag behind a validation error's location (the pipeline layout fields are Megatron's flag names)."""
    if loc and str(loc[-1]) in PipelineLayout.model_fields:
        return "--" + str(loc[-1]).replace("_", "-")
    return ".".join(str(p) for p in loc)
