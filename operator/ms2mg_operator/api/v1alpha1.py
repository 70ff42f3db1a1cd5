"""`CheckpointConversion` (ms2mg.io/v1alpha1): the one source of the CRD schema, the validation and the docs.

Field descriptions become `kubectl explain` text (through `crdgen.py`) and the reference in the docs. Spec
models forbid unknown fields and are frozen; status models ignore unknown fields so that a status written by
another operator version still reads. Enumerations are the converter's own (`ms2mg_converter.config`), so
the resource and the `ms2mg convert` flags cannot drift apart.

Schema-only markers are given through `json_schema_extra`:
* `x-kubernetes-validations`: CEL rules the API server checks (Kubernetes 1.25+; older servers ignore them,
  the operator checks the same rules in Python);
* `x-kubernetes-preserve-unknown-fields`: Kubernetes pass-through objects (resources, affinity, tolerations);
* `default`: kept by the generator only where a model default is a constant of the conversion's meaning.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from ms2mg_converter.config import (
    DType,
    Fc1Layout,
    ModelOverrides,
    Normalization,
    PadFill,
    PositionEmbedding,
    QkvLayout,
    TransformerImpl,
)

JsonDict = dict[str, JsonValue]

GROUP = "ms2mg.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CheckpointConversion"
PLURAL = "checkpointconversions"
SINGULAR = "checkpointconversion"
SHORT_NAMES = ("ckptconv",)

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
MAX_PATH = 1024
MAX_SIZE = 1 << 24
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

PATH_RULES: list[JsonValue] = [
    {"rule": "!self.startsWith('/')", "message": "must be relative to the volume (no leading '/')"},
    {"rule": "!self.matches('(^|/)[.][.]?(/|$)')", "message": "must not contain '.' or '..' segments"},
    {"rule": "!self.contains('//') && !self.endsWith('/')",
     "message": "must not contain empty segments ('//' or a trailing '/')"},
]
OVERLAP_MESSAGE = "destination must not be, contain or lie inside the source on the same PVC"
OVERLAP_RULE: JsonDict = {
    "rule": "self.source.pvc != self.destination.pvc || (self.source.path != self.destination.path"
            " && !self.destination.path.startsWith(self.source.path + '/')"
            " && !self.source.path.startsWith(self.destination.path + '/'))",
    "message": OVERLAP_MESSAGE,
}


def check_relative_path(value: str) -> str:
    """Reject absolute paths, '.'/'..' segments, empty segments and control characters."""
    if value.startswith("/"):
        raise ValueError("must be relative to the volume (no leading '/')")
    if _CONTROL_CHARS.search(value):
        raise ValueError("must not contain control characters")
    segments = value.split("/")
    if "" in segments:
        raise ValueError("must not contain empty segments ('//' or a trailing '/')")
    if any(s in (".", "..") for s in segments):
        raise ValueError("must not contain '.' or '..' segments")
    return value


def paths_overlap(a: str, b: str) -> bool:
    """True when one relative path equals the other or lies inside it."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


RelativePath = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PATH,
          json_schema_extra={"pattern": r"^[^\x00-\x1f\x7f]+$", "x-kubernetes-validations": PATH_RULES}),
    AfterValidator(check_relative_path),
]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
Count = Annotated[int, Field(ge=1, le=MAX_SIZE)]
OpenObject = Annotated[
    dict[str, JsonValue],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
NESTED_DEFAULT: JsonDict = {"default": {}}
"""Schema default of a nested object: the API server then fills its fields' own defaults."""


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class SourceSpec(_Spec):
    """Where the MindFormers checkpoint is read from (mounted read-only)."""

    pvc: ObjectName = Field(description="Name of a PersistentVolumeClaim in the namespace of this resource.")
    path: RelativePath = Field(
        description="Path relative to the root of the volume: a .safetensors file, a directory of "
                    "*.safetensors files, or a directory with model.safetensors.index.json. Absolute paths, "
                    "'.', '..' and empty segments are rejected.")


class DestinationSpec(_Spec):
    """Where the Megatron-LM checkpoint is written (mounted read-write)."""

    pvc: ObjectName = Field(description="Name of a PersistentVolumeClaim in the namespace of this resource. "
                                        "May be the source's claim when the paths do not overlap.")
    path: RelativePath = Field(
        description="Directory relative to the root of the volume that receives the checkpoint "
                    "(iter_0000001/mp_rank_*/model_optim_rng.pt and latest_checkpointed_iteration.txt). "
                    "It must not exist or be empty unless overwrite is true. Absolute paths, '.', '..' and "
                    "empty segments are rejected.")


class ParallelismSpec(_Spec):
    """Tensor- and pipeline-parallel sizes of the written checkpoint."""

    tensor: int = Field(default=1, ge=1, le=4096, description="Tensor-parallel size (TP) of the output.")
    pipeline: int = Field(default=1, ge=1, le=4096, description="Pipeline-parallel size (PP) of the output.")


class ModelSpec(_Spec):
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

    def to_overrides(self) -> ModelOverrides:
        """The same values as the converter's `ModelOverrides` (for the torch-free plan check)."""
        return ModelOverrides(**self.model_dump(exclude_none=True))


class VocabSpec(_Spec):
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


class LayoutsSpec(_Spec):
    """Row order of fused tensors in the source. Unset: taken from the checkpoint, or refused when it
    matters."""

    qkv: QkvLayout | None = Field(
        default=None, description="--qkv-layout: grouped (per query group: Q heads, K, V) or contiguous "
                                  "(all Q, all K, all V).")
    fc1: Fc1Layout | None = Field(
        default=None, description="--fc1-layout: gate-up (all gate rows, then all up rows) or interleaved "
                                  "(rows alternate gate, up).")


class LocalObjectReference(_Spec):
    """A reference to an object in the same namespace."""

    name: ObjectName = Field(description="Name of the referenced object.")


class CheckpointConversionSpec(_Spec):
    """The conversion to run and the settings of the Job that runs it. Changing it starts a new Job."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [OVERLAP_RULE]})

    source: SourceSpec = Field(description="The MindFormers checkpoint to read (mounted read-only).")
    destination: DestinationSpec = Field(description="Where to write the Megatron-LM checkpoint.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, json_schema_extra=NESTED_DEFAULT,
                                         description="Tensor- and pipeline-parallel sizes of the output.")
    model: ModelSpec | None = Field(default=None, description="Architecture overrides and cross-checks.")
    vocab: VocabSpec = Field(default_factory=VocabSpec, json_schema_extra=NESTED_DEFAULT,
                             description="Vocabulary trimming and padding.")
    dtype: DType = Field(default=DType.BF16,
                         description="--dtype of the written tensors: bf16, fp16 or fp32.")
    transformer_impl: TransformerImpl = Field(
        default=TransformerImpl.LOCAL,
        description="--saver-transformer-impl: key names of the output, local or transformer_engine.")
    layouts: LayoutsSpec | None = Field(default=None, description="Row order of fused tensors in the source.")
    verify: bool = Field(default=True, description="Check the written checkpoint against the source "
                                                   "(false adds --no-verify).")
    overwrite: bool = Field(default=False, description="Replace a non-empty destination (adds --overwrite).")
    final_norm_extra_state: bool = Field(
        default=True, description="Write decoder.final_layernorm._extra_state, as Megatron does when "
                                  "TransformerEngine is installed; false (--no-final-norm-extra-state) for a "
                                  "consumer without TransformerEngine.")
    ignore_keys: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, max_length=64, description="--ignore-keys: glob patterns of source keys to drop instead "
                                                 "of failing on them.")
    allow_nonfinite: bool = Field(default=False, description="--allow-nonfinite: convert weights holding "
                                                             "NaN/Inf instead of refusing.")
    image: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^[^\s]+$",
                              description="Converter image. Default: the operator's converter image. Must match "
                                          "the operator's allowed images (default: its converter image's "
                                          "repository).")
    resources: OpenObject | None = Field(
        default=None, description="Container resources (requests/limits), as in a Pod. Default: the "
                                  "operator's default resources.")
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=64, description="Node labels the converter pod must match.")
    tolerations: list[OpenObject] | None = Field(default=None, max_length=64,
                                                  description="Pod tolerations, as in a Pod.")
    affinity: OpenObject | None = Field(default=None, description="Pod affinity, as in a Pod.")
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None, max_length=16, description="Secrets to pull the converter image with.")
    service_account_name: ObjectName | None = Field(
        default=None, description="ServiceAccount of the converter pod (its token is never mounted). "
                                  "Default: the operator's converter ServiceAccount; others must be on the "
                                  "operator's allow-list.")
    priority_class_name: ObjectName | None = Field(default=None, description="PriorityClass of the pod.")
    queue_name: Annotated[str, Field(min_length=1, max_length=63, pattern=LABEL_VALUE)] | None = Field(
        default=None, description="Kueue LocalQueue: the Job gets the kueue.x-k8s.io/queue-name label and "
                                  "starts suspended until Kueue admits it.")
    backoff_limit: int | None = Field(default=None, ge=0, le=100,
                                      description="Retries of the Job after a retriable failure. Default: "
                                                  "the operator's. Bad input never retries.")
    active_deadline_seconds: int | None = Field(default=None, ge=1, le=30 * 86400,
                                                description="Time limit of the Job in seconds. Default: the "
                                                            "operator's (none unless configured).")
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=365 * 86400,
        description="Seconds after which a finished Job is deleted. Default: the operator's.")

    @model_validator(mode="after")
    def _destination_apart_from_source(self) -> CheckpointConversionSpec:
        same_claim = self.source.pvc == self.destination.pvc
        if same_claim and paths_overlap(self.source.path, self.destination.path):
            raise ValueError(OVERLAP_MESSAGE)
        return self


class ConditionType(StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    ACCEPTED = "Accepted"
    QUEUED = "Queued"
    RUNNING = "Running"
    VERIFIED = "Verified"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Phase(StrEnum):
    """One-word summary of the state, for the STATUS column and simple clients (the conditions hold the detail)."""

    WAITING = "Waiting"
    REJECTED = "Rejected"
    QUEUED = "Queued"
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Status):
    """One aspect of the state, following the Kubernetes API conventions (metav1.Condition)."""

    type: ConditionType = Field(description="Ready, Reconciling, Stalled (the kstatus/Flux summary), or a stage: "
                                            "Accepted, Queued, Running, Verified, Succeeded, Failed.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, pattern=CONDITION_REASON,
                        description="CamelCase reason of the last transition.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: int | None = Field(default=None, ge=0,
                                            description="The .metadata.generation this condition is about.")


class ConversionResultStatus(_Status):
    """The converter's result, from its JSON termination message."""

    status: Literal["Succeeded", "Failed"] = Field(description="Outcome reported by the converter.")
    reason: str = Field(max_length=1024, description="The converter's CamelCase reason.")
    exit_code: int = Field(default=0, description="Exit code of the converter.")
    files: int = Field(default=0, ge=0, description="Files written.")
    bytes: int = Field(default=0, ge=0, description="Bytes written.")
    seconds: float = Field(default=0.0, ge=0, description="Wall time of the conversion in seconds.")
    padded_vocab_size: int | None = Field(default=None, description="Rows of the written embedding table.")
    manifest_path: str | None = Field(default=None, max_length=4096,
                                      description="Path of ms2mg-manifest.json inside the converter pod.")
    verified: bool = Field(default=False, description="The output was checked against the source.")
    peak_rss_bytes: int | None = Field(default=None, ge=0, description="Peak resident memory of the converter.")
    converter_version: str = Field(default="", max_length=64, description="Version of the converter.")


class CheckpointConversionStatus(_Status):
    """Observed state, written by the operator only."""

    observed_generation: int | None = Field(default=None,
                                            description="The .metadata.generation last handled.")
    phase: Phase | None = Field(
        default=None, description="Summary of the observed generation's state: Waiting (for a PVC, an older "
                                  "conversion of the same destination or the previous generation's pods), Rejected "
                                  "(the spec must change), Queued, Pending, Running, Succeeded or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Ready (True only when converted), Reconciling (True while work is under way) and Stalled "
                    "(True when only a spec change can help), then the stages in the order the conversion "
                    "reaches them; the last one is the latest stage.")
    job_name: str | None = Field(default=None, max_length=63,
                                 description="The Job of the observed generation.")
    start_time: datetime | None = Field(default=None, description="When the Job started.")
    completion_time: datetime | None = Field(default=None, description="When the Job finished.")
    progress: str | None = Field(default=None, max_length=64,
                                 description="Tensor groups done/total, from the converter's progress lines.")
    result: ConversionResultStatus | None = Field(default=None, description="The converter's result.")

    def condition(self, kind: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)


class ObjectMeta(BaseModel):
    """The metadata fields the operator uses."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    name: str
    namespace: str
    uid: str
    generation: int = 1
    creation_timestamp: datetime | None = None


class CheckpointConversion(BaseModel):
    """A validated resource: metadata, spec and (possibly empty) status."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta
    spec: CheckpointConversionSpec
    status: CheckpointConversionStatus = Field(default_factory=CheckpointConversionStatus)


ROOT_DESCRIPTION = (
    "CheckpointConversion converts a MindSpore Transformers (MindFormers) checkpoint on a "
    "PersistentVolumeClaim into a Megatron-LM checkpoint on a PersistentVolumeClaim, by running `ms2mg "
    "convert` in a Job. Wait for it with `kubectl wait --for=condition=Succeeded`."
)
