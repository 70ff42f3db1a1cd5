"""What is converted: the output's parallel layout, the model values and facts, the vocabulary, the source's
fused layouts and the MindFormers YAML. Every field is named as its `ms2mg convert` flag; enumerations are
the converter's own (`ms2mg_converter.config`), so the resource and the flags cannot drift apart.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from ms2mg_converter.config import (
    CkptFormat,
    Fc1Layout,
    ModelOverrides,
    Normalization,
    PadFill,
    PipelineLayout,
    PositionEmbedding,
    QkvLayout,
)
from ms2mg_operator.api.types import Count, ObjectName, RelativePath, Spec


class ParallelismSpec(Spec):
    """Tensor- and pipeline-parallel sizes of the written checkpoint."""

    tensor: int = Field(default=1, ge=1, le=4096, description="Tensor-parallel size (TP) of the output.")
    pipeline: int = Field(default=1, ge=1, le=4096, description="Pipeline-parallel size (PP) of the output.")
    decoder_first_pipeline_num_layers: Count | None = Field(
        default=None, description="--decoder-first-pipeline-num-layers: layers on the first pipeline stage (the "
                                  "other stages share the rest evenly).")
    decoder_last_pipeline_num_layers: Count | None = Field(
        default=None, description="--decoder-last-pipeline-num-layers: layers on the last pipeline stage.")
    num_layers_per_virtual_pipeline_stage: Count | None = Field(
        default=None, description="--num-layers-per-virtual-pipeline-stage: layers per virtual chunk "
                                  "(interleaved schedule; rank files hold model0, model1, ...).")
    num_virtual_stages_per_pipeline_rank: Count | None = Field(
        default=None, description="--num-virtual-stages-per-pipeline-rank: virtual chunks per pipeline rank (the "
                                  "way to combine them with uneven first/last stages).")

    expert: int = Field(default=1, ge=1, le=4096,
                        description="--target-expert-parallel-size: expert-parallel size (EP) of a MoE output; rank "
                                    "files mp_rank_TT[_PPP]_EEE each hold num_experts/EP experts.")
    expert_tensor: int | None = Field(
        default=None, ge=1, le=4096,
        description="--target-expert-tensor-parallel-size: expert tensor-parallel size. Default: tensor (the only "
                    "value the torch format expresses).")

    def to_layout(self) -> PipelineLayout:
        """The same values as the converter's `PipelineLayout` (for the torch-free pre-flight check)."""
        return PipelineLayout(**self.model_dump(exclude={"tensor", "pipeline", "expert", "expert_tensor"},
                                                exclude_none=True))


class ModelSpec(Spec):
    """Architecture values, named as the `ms2mg convert` flags. Unset values are inferred from the tensors;
    set values are cross-checked against them, and TP/PP divisibility is checked before a Job starts."""

    num_layers: Count | None = Field(default=None, description="--num-layers: transformer layers.")
    hidden_size: Count | None = Field(default=None, description="--hidden-size: hidden size.")
    ffn_hidden_size: Count | None = Field(
        default=None, description="--ffn-hidden-size: MLP hidden size (per gate/up half with SwiGLU).")
    num_attention_heads: Count | None = Field(default=None, description="--num-attention-heads.")
    num_query_groups: Count | None = Field(
        default=None, description="--num-query-groups: query groups (KV heads) with grouped-query attention.")
    kv_channels: Count | None = Field(default=None, description="--kv-channels: head dimension.")
    swiglu: bool | None = Field(default=None, description="--swiglu / --no-swiglu: SwiGLU MLP.")
    add_bias_linear: bool | None = Field(default=None,
                                         description="--add-bias-linear: biases on all linears.")
    qkv_bias: bool | None = Field(default=None, description="--qkv-bias: bias on linear_qkv only (Qwen2).")
    qk_layernorm: bool | None = Field(default=None, description="--qk-layernorm: q/k layernorm (Qwen3).")
    normalization: Normalization | None = Field(default=None,
                                                description="--normalization: RMSNorm or LayerNorm.")
    position_embedding_type: PositionEmbedding | None = Field(
        default=None, description="--position-embedding-type: rope or learned_absolute.")
    untie_embeddings_and_output_weights: bool | None = Field(
        default=None, description="--untie-embeddings-and-output-weights: separate output layer.")
    seq_length: Count | None = Field(default=None,
                                     description="--seq-length: stored in the checkpoint's args.")
    max_position_embeddings: Count | None = Field(
        default=None, description="--max-position-embeddings: model fact stored in args (RoPE models).")
    rotary_base: float | None = Field(default=None, gt=0, description="--rotary-base: RoPE base (theta).")
    rotary_percent: float | None = Field(default=None, gt=0, le=1,
                                         description="--rotary-percent: fraction of the head dim RoPE rotates.")
    rotary_interleaved: bool | None = Field(
        default=None, description="--rotary-interleaved: RoPE on adjacent pairs (GLM) instead of halves.")
    norm_epsilon: float | None = Field(default=None, gt=0, description="--norm-epsilon: epsilon of the norms.")
    q_lora_rank: Count | None = Field(default=None,
                                      description="--q-lora-rank: MLA query compression rank (checked against "
                                                  "the tensors).")
    kv_lora_rank: Count | None = Field(default=None, description="--kv-lora-rank: MLA key/value compression rank.")
    qk_head_dim: Count | None = Field(default=None, description="--qk-head-dim: MLA q/k head dim without RoPE.")
    qk_pos_emb_head_dim: Count | None = Field(
        default=None, description="--qk-pos-emb-head-dim: MLA RoPE head dim (needed for a fused linear_qkv "
                                  "without query compression).")
    v_head_dim: Count | None = Field(default=None, description="--v-head-dim: MLA value head dim.")
    rope_type: Literal["rope", "yarn"] | None = Field(
        default=None, description="--rope-type: RoPE variant of an MLA model (required for MLA unless the YAML "
                                  "states it).")
    rotary_scaling_factor: float | None = Field(default=None, gt=0,
                                                description="--rotary-scaling-factor: YaRN scaling factor.")
    original_max_position_embeddings: Count | None = Field(
        default=None, description="--original-max-position-embeddings: YaRN original context length.")
    beta_fast: float | None = Field(default=None, description="--beta-fast: YaRN beta_fast.")
    beta_slow: float | None = Field(default=None, description="--beta-slow: YaRN beta_slow.")
    mscale: float | None = Field(default=None, description="--mscale: YaRN mscale.")
    mscale_all_dim: float | None = Field(default=None, description="--mscale-all-dim: YaRN mscale_all_dim.")

    def to_overrides(self) -> ModelOverrides:
        """The same values as the converter's `ModelOverrides` (for the torch-free plan check)."""
        return ModelOverrides(**self.model_dump(exclude_none=True))


class VocabSpec(Spec):
    """Vocabulary trimming and padding."""

    true_size: Count | None = Field(
        default=None, description="--true-vocab-size: real vocabulary size; the embedding table is trimmed "
                                  "to it, then padded. Unset: the table is kept as it is, then padded.")
    make_divisible_by: int = Field(
        default=128, ge=1, le=65536,
        description="--make-vocab-size-divisible-by: pad the vocabulary to a multiple of this times TP, as "
                    "Megatron-LM does.")
    pad_fill: PadFill = Field(default=PadFill.LAST_ROW,
                              description="--vocab-pad-fill: padding rows copy the last row (last-row) or "
                                          "are zero (zero).")


class LayoutsSpec(Spec):
    """Row order of fused tensors in the source. Unset: taken from the checkpoint, or refused when it
    matters."""

    qkv: QkvLayout | None = Field(
        default=None, description="--qkv-layout: grouped (per query group: Q heads, K, V) or contiguous "
                                  "(all Q, all K, all V).")
    fc1: Fc1Layout | None = Field(
        default=None, description="--fc1-layout: gate-up (all gate rows, then all up rows) or interleaved "
                                  "(rows alternate gate, up).")
    source_tensor_parallel: int | None = Field(
        default=None, ge=1, le=4096,
        description="--source-tensor-parallel-size: TP size the source was trained with (the YAML's "
                    "parallel_config.model_parallel); contiguous layouts are per training rank, so a contiguous "
                    "qkv needs it.")


class ConfigMapKey(Spec):
    """One key of a ConfigMap in the namespace of this resource."""

    name: ObjectName = Field(description="Name of the ConfigMap.")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key holding the MindFormers YAML.")


class ConfigSpec(Spec):
    """The MindFormers model YAML (--config): heads, groups, layouts, model facts, the training's TP size.
    Exactly one of configMap or path."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.configMap) != has(self.path)", "message": "set exactly one of configMap or path"}]})

    config_map: ConfigMapKey | None = Field(
        default=None, description="A ConfigMap key holding the YAML, mounted read-only into the converter pod. "
                                  "The operator does not read ConfigMaps: a missing one keeps the pod Pending "
                                  "(FailedMount) and the resource shows the pod's message.")
    path: RelativePath | None = Field(default=None,
                                      description="The YAML's path relative to the root of the source volume.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ConfigSpec:
        if (self.config_map is None) == (self.path is None):
            raise ValueError("set exactly one of configMap or path")
        return self




class MoeSpec(Spec):
    """Mixture-of-experts: the output's expert key layout and the router facts the tensors cannot tell (experts,
    shared experts and first dense layers are read from the tensors)."""

    grouped_gemm: bool = Field(default=False,
                               description="--moe-grouped-gemm: experts as TEGroupedMLP (linear_fc1.weight0..) for "
                                           "Megatron's --moe-grouped-gemm; default SequentialMLP (local_experts.N).")
    router_topk: int | None = Field(default=None, ge=1, le=4096,
                                    description="--moe-router-topk: experts per token. Required for a MoE model "
                                                "unless the YAML states moe_router_topk or num_experts_per_tok.")
    router_score_function: Literal["softmax", "sigmoid"] | None = Field(
        default=None, description="--moe-router-score-function. Default: the YAML's, else softmax (reported as "
                                  "defaulted).")
    router_topk_scaling_factor: float | None = Field(
        default=None, gt=0, description="--moe-router-topk-scaling-factor (DeepSeek routed_scaling_factor).")
    router_num_groups: int | None = Field(default=None, ge=1, le=4096,
                                          description="--moe-router-num-groups (DeepSeek n_group).")
    router_group_topk: int | None = Field(default=None, ge=1, le=4096,
                                          description="--moe-router-group-topk (DeepSeek topk_group).")
    router_pre_softmax: bool | None = Field(
        default=None, description="--moe-router-pre-softmax / --no-moe-router-pre-softmax: softmax before top-k "
                                  "(Qwen3-MoE norm_topk_prob: False).")


class OutputSpec(Spec):
    """How the Megatron-LM checkpoint is stored."""

    format: CkptFormat = Field(default=CkptFormat.TORCH,
                               description="--ckpt-format: Megatron-LM's on-disk checkpoint format.")
