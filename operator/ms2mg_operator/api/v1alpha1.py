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

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from ms2mg_converter.config import DType, SourceDigest, TransformerImpl
from ms2mg_operator.api.specs import (
    ConfigMapKey,
    ConfigSpec,
    LayoutsSpec,
    ModelSpec,
    MoeSpec,
    OutputSpec,
    ParallelismSpec,
    VocabSpec,
)
from ms2mg_operator.api.types import (
    API_VERSION,
    CONDITION_REASON,
    DNS1123_SUBDOMAIN,
    GROUP,
    KIND,
    LABEL_VALUE,
    MAX_PATH,
    NESTED_DEFAULT,
    OVERLAP_MESSAGE,
    OVERLAP_RULE,
    PATH_RULES,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    JsonDict,
    ObjectName,
    OpenObject,
    RelativePath,
    Spec,
    Status,
    check_relative_path,
    paths_overlap,
)

__all__ = [
    "API_VERSION",
    "DNS1123_SUBDOMAIN",
    "GROUP",
    "KIND",
    "MAX_PATH",
    "PATH_RULES",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "CheckpointConversion",
    "CheckpointConversionSpec",
    "CheckpointConversionStatus",
    "Condition",
    "ConditionStatus",
    "ConditionType",
    "ConfigMapKey",
    "ConfigSpec",
    "ConversionResultStatus",
    "DestinationSpec",
    "JsonDict",
    "LayoutsSpec",
    "LocalObjectReference",
    "ModelSpec",
    "MoeSpec",
    "ObjectMeta",
    "OutputSpec",
    "ParallelismSpec",
    "Phase",
    "SourceSpec",
    "VocabSpec",
    "check_relative_path",
    "paths_overlap",
]


class SourceSpec(Spec):
    """Where the MindFormers checkpoint is read from (mounted read-only)."""

    pvc: ObjectName = Field(description="Name of a PersistentVolumeClaim in the namespace of this resource.")
    path: RelativePath = Field(
        description="Path relative to the root of the volume: a .safetensors file, a directory of "
                    "*.safetensors files, a directory with model.safetensors.index.json, or a distributed "
                    "checkpoint's directory of rank_N/ subdirectories. Absolute paths, '.', '..' and empty "
                    "segments are rejected.")
    strategy: RelativePath | None = Field(
        default=None,
        description="--src-strategy, for a distributed source: the MindSpore strategy file (.ckpt or .json) or "
                    "the directory of them, relative to the root of the source volume. Default: "
                    "<path>/strategy or the strategy directory beside <path>.")
    ckpt_suffix: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=r"^[-_.a-zA-Z0-9]+$",
        description="--src-ckpt-suffix, for a distributed source: read the file of each rank_N/ that ends in "
                    "-<suffix>.safetensors (e.g. 2_100). Default: meta.json's last_ckpt_file, else the highest "
                    "epoch_step.")


class DestinationSpec(Spec):
    """Where the Megatron-LM checkpoint is written (mounted read-write)."""

    pvc: ObjectName = Field(description="Name of a PersistentVolumeClaim in the namespace of this resource. "
                                        "May be the source's claim when the paths do not overlap.")
    path: RelativePath = Field(
        description="Directory relative to the root of the volume that receives the checkpoint "
                    "(iter_0000001/mp_rank_*/model_optim_rng.pt and latest_checkpointed_iteration.txt). "
                    "It must not exist or be empty unless overwrite is true. Absolute paths, '.', '..' and "
                    "empty segments are rejected.")


class LocalObjectReference(Spec):
    """A reference to an object in the same namespace."""

    name: ObjectName = Field(description="Name of the referenced object.")


class CheckpointConversionSpec(Spec):
    """The conversion to run and the settings of the Job that runs it. Changing it starts a new Job."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [OVERLAP_RULE]})

    source: SourceSpec = Field(description="The MindFormers checkpoint to read (mounted read-only).")
    destination: DestinationSpec = Field(description="Where to write the Megatron-LM checkpoint.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, json_schema_extra=NESTED_DEFAULT,
                                         description="Tensor- and pipeline-parallel sizes of the output.")
    output: OutputSpec = Field(default_factory=OutputSpec, json_schema_extra=NESTED_DEFAULT,
                               description="How the Megatron-LM checkpoint is stored.")
    model: ModelSpec | None = Field(default=None, description="Architecture overrides and cross-checks.")
    moe: MoeSpec | None = Field(default=None, description="Mixture-of-experts output layout and router facts.")
    vocab: VocabSpec = Field(default_factory=VocabSpec, json_schema_extra=NESTED_DEFAULT,
                             description="Vocabulary trimming and padding.")
    dtype: DType = Field(default=DType.BF16,
                         description="--dtype of the written tensors: bf16, fp16 or fp32.")
    transformer_impl: TransformerImpl = Field(
        default=TransformerImpl.LOCAL,
        description="--saver-transformer-impl: key names of the output, local or transformer_engine.")
    layouts: LayoutsSpec | None = Field(default=None, description="Row order of fused tensors in the source.")
    config: ConfigSpec | None = Field(
        default=None, description="The MindFormers model YAML (--config): architecture values, layout flags, model "
                                  "facts (RoPE base, norm epsilon, ...) and the training's TP size. Values in model "
                                  "and layouts win over it.")
    source_digest: SourceDigest = Field(
        default=SourceDigest.CRC32,
        description="--source-digest: digest of the source's content recorded in the manifest, by which a rerun "
                    "is recognised as already converted: crc32 or sha256.")
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


class Condition(Status):
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


class ConversionResultStatus(Status):
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
    defaulted: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=32,
        description="Model facts neither the spec, the YAML nor the naming family stated, set to Megatron's "
                    "defaults (rotary_base, norm_epsilon, ...): check them.")


class CheckpointConversionStatus(Status):
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
