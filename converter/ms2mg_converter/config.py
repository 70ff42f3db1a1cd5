"""What the user asked for: `ConvertConfig`, validated, frozen, without torch.

The command line (`cli.py`) builds one from flags; the operator renders the same flags from a
`CheckpointConversion` spec. Architecture values given here are *overrides and cross-checks*: the
architecture itself is inferred from the tensors (`arch.py`) and every given value must agree with it.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class QkvLayout(StrEnum):
    """Row order of a fused `linear_qkv` tensor in the source."""

    GROUPED = "grouped"
    """Megatron's: per query group, the group's Q heads then its K head then its V head (MindFormers r1.7+
    default, `use_contiguous_weight_layout_attention: False`)."""
    CONTIGUOUS = "contiguous"
    """All Q rows, then all K rows, then all V rows (MindFormers r1.6/dev default,
    `use_contiguous_weight_layout: True`)."""


class Fc1Layout(StrEnum):
    """Row order of a fused SwiGLU `linear_fc1` tensor in the source."""

    GATE_UP = "gate-up"
    """Megatron's: all gate rows, then all up rows (`use_interleaved_weight_layout_mlp: False`)."""
    INTERLEAVED = "interleaved"
    """Rows alternate gate, up, gate, up (MindFormers r1.7+ default, `use_interleaved_weight_layout_mlp`)."""


class DType(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class PadFill(StrEnum):
    LAST_ROW = "last-row"
    """Replicate the last real row into the padding rows (what Megatron's saver does)."""
    ZERO = "zero"


class Normalization(StrEnum):
    RMSNORM = "RMSNorm"
    LAYERNORM = "LayerNorm"


class PositionEmbedding(StrEnum):
    ROPE = "rope"
    LEARNED_ABSOLUTE = "learned_absolute"


class CkptFormat(StrEnum):
    """Megatron-LM's on-disk checkpoint format of the output (`--ckpt-format`)."""

    TORCH = "torch"
    """The legacy per-rank format: iter_*/mp_rank_*/model_optim_rng.pt, one torch.save file per rank."""
    TORCH_DIST = "torch_dist"
    """Megatron's distributed format (torch.distributed.checkpoint): iter_*/__0_0.distcp with every tensor
    stored once, whole (TP 1, layers stacked); Megatron reshards it to any TP/PP when it loads it."""


class SourceDigest(StrEnum):
    """How the source's content is fingerprinted in the manifest (what a rerun is compared by)."""

    CRC32 = "crc32"
    """CRC-32 of every byte of every source file (zlib-ng, SIMD: several GB/s per core)."""
    SHA256 = "sha256"
    """sha256 of every byte of every source file: cryptographic, several times slower."""


class TransformerImpl(StrEnum):
    LOCAL = "local"
    TRANSFORMER_ENGINE = "transformer_engine"


class ModelOverrides(BaseModel):
    """Architecture values from flags or a MindFormers YAML. None means: infer from the tensors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: int | None = Field(default=None, ge=1)
    hidden_size: int | None = Field(default=None, ge=1)
    ffn_hidden_size: int | None = Field(default=None, ge=1)
    num_attention_heads: int | None = Field(default=None, ge=1)
    num_query_groups: int | None = Field(default=None, ge=1)
    kv_channels: int | None = Field(default=None, ge=1)
    swiglu: bool | None = None
    add_bias_linear: bool | None = None
    qkv_bias: bool | None = None
    qk_layernorm: bool | None = None
    untie_embeddings_and_output_weights: bool | None = None
    normalization: Normalization | None = None
    position_embedding_type: PositionEmbedding | None = None
    padded_vocab_size: int | None = Field(default=None, ge=1)
    """The rows of the source embedding table (the reference pipeline's meaning): checked, not applied."""
    seq_length: int | None = Field(default=None, ge=1)
    max_position_embeddings: int | None = Field(default=None, ge=1)
    rotary_base: float | None = Field(default=None, gt=0)
    rotary_percent: float | None = Field(default=None, gt=0, le=1)
    rotary_interleaved: bool | None = None
    norm_epsilon: float | None = Field(default=None, gt=0)
    # Multi-latent attention (MLA, DeepSeek-V2/V3): the head split the tensors cannot tell, and the RoPE
    # scaling facts (megatron-core MLATransformerConfig's names; `model.mla`).
    q_lora_rank: int | None = Field(default=None, ge=1)
    kv_lora_rank: int | None = Field(default=None, ge=1)
    qk_head_dim: int | None = Field(default=None, ge=1)
    qk_pos_emb_head_dim: int | None = Field(default=None, ge=1)
    v_head_dim: int | None = Field(default=None, ge=1)
    rope_type: Literal["rope", "yarn"] | None = None
    rotary_scaling_factor: float | None = Field(default=None, gt=0)
    original_max_position_embeddings: int | None = Field(default=None, ge=1)
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def merged_over(self, base: ModelOverrides) -> ModelOverrides:
        """These values where set, else `base`'s (flags win over the YAML)."""
        mine = self.model_dump(exclude_none=True)
        return base.model_copy(update=mine)


class VocabConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    true_vocab_size: int | None = Field(default=None, ge=1)
    make_vocab_size_divisible_by: int = Field(default=128, ge=1)
    pad_fill: PadFill = PadFill.LAST_ROW


class LayoutConfig(BaseModel):
    """Source layouts of fused tensors. None: take from the YAML, or refuse when it matters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    qkv: QkvLayout | None = None
    fc1: Fc1Layout | None = None
    source_tensor_parallel: int | None = Field(default=None, ge=1)
    """Tensor-parallel size the source was trained with: contiguous layouts ([Q;K;V], [gate; up]) are
    then per source rank ([Q_r;K_r;V_r] ...), because MindFormers splits each rank's own slice."""


class PipelineLayout(BaseModel):
    """How the layers are spread over the pipeline stages and virtual chunks of the output.

    Field names are Megatron-LM's argument names (flags `--decoder-first-pipeline-num-layers` ...), and they
    are stored as such in the checkpoint's `args`. All None: every stage holds num_layers / PP layers, one
    chunk per stage. The rules that combine them are in `pipeline.py`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    decoder_first_pipeline_num_layers: int | None = Field(default=None, ge=1)
    """Layers on the first pipeline stage (the other stages share the rest evenly)."""
    decoder_last_pipeline_num_layers: int | None = Field(default=None, ge=1)
    """Layers on the last pipeline stage."""
    num_layers_per_virtual_pipeline_stage: int | None = Field(default=None, ge=1)
    """Layers per virtual chunk (interleaved schedule); only with evenly split stages, as in Megatron."""
    num_virtual_stages_per_pipeline_rank: int | None = Field(default=None, ge=1)
    """Virtual chunks per pipeline rank (interleaved schedule); the way to combine them with uneven stages."""


class MoeConfig(BaseModel):
    """Mixture-of-experts: the target's expert layout and parallelism, and router facts the tensors cannot
    tell (None: from the --config YAML, else refused (topk) or Megatron's default, reported as defaulted)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    expert_parallel: int = Field(default=1, ge=1)
    """Expert-parallel size of the output (`--target-expert-parallel-size`): files mp_rank_TT[_PPP]_EEE."""
    expert_tensor_parallel: int | None = Field(default=None, ge=1)
    """Expert tensor-parallel size; None: the tensor-parallel size (the only value the torch format names)."""
    grouped_gemm: bool = False
    """Write experts as TEGroupedMLP (`linear_fc1.weight0..`) instead of SequentialMLP (`local_experts.N`)."""
    router_topk: int | None = Field(default=None, ge=1)
    router_score_function: str | None = Field(default=None, pattern="^(softmax|sigmoid)$")
    router_topk_scaling_factor: float | None = Field(default=None, gt=0)
    router_num_groups: int | None = Field(default=None, ge=1)
    router_group_topk: int | None = Field(default=None, ge=1)
    router_pre_softmax: bool | None = None

    def merged_over(self, base: MoeConfig) -> MoeConfig:
        """These values where set, else `base`'s (flags win over the YAML)."""
        return base.model_copy(update=self.model_dump(exclude_none=True, exclude_defaults=True))


class ConvertConfig(BaseModel):
    """One conversion request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    load_dir: Path
    save_dir: Path | None = None
    tensor_parallel: int = Field(default=1, ge=1)
    pipeline_parallel: int = Field(default=1, ge=1)
    pipeline_layout: PipelineLayout = PipelineLayout()
    model: ModelOverrides = ModelOverrides()
    vocab: VocabConfig = VocabConfig()
    layouts: LayoutConfig = LayoutConfig()
    moe: MoeConfig = MoeConfig()
    dtype: DType = DType.BF16
    ckpt_format: CkptFormat = CkptFormat.TORCH
    source_digest: SourceDigest = SourceDigest.CRC32
    transformer_impl: TransformerImpl = TransformerImpl.LOCAL
    final_norm_extra_state: bool = True
    """Write `decoder.final_layernorm._extra_state` (None), as Megatron does when TransformerEngine is
    installed. Turn off for a consumer without TransformerEngine (plain `torch.nn.RMSNorm` final norm)."""
    tokenizer_type: str = "HuggingFaceTokenizer"
    ignore_keys: tuple[str, ...] = ()
    allow_nonfinite: bool = False
    overwrite: bool = False
    verify: bool = True
    config_yaml: Path | None = None
    src_strategy: Path | None = None
    """A distributed source's MindSpore strategy file or directory (`--src-strategy`); None: looked for in
    `<load_dir>/strategy` and `<load_dir>/../strategy`."""
    src_ckpt_suffix: str | None = None
    """Which file of each `rank_N/` directory to read: the one ending in `<suffix>.safetensors`."""
    load_root: Path | None = None
    """Read nothing that resolves (symlinks included) outside this directory: the source volume."""
    save_root: Path | None = None
    """Write nothing that resolves (symlinks included) outside this directory: the destination volume."""
