"""Render the batch/v1 Job of one generation of a `CheckpointConversion` (a pure function, no API calls).

The Job runs `ms2mg convert` with flags rendered from the spec, never through a shell. The source claim is
mounted read-only at /mnt/source and the destination read-write at /mnt/destination (one volume mounted twice
when both are the same claim); paths from the spec are joined below these mount points. The converter writes
its JSON result to /dev/termination-log and one JSON progress line per tensor group to stdout.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

from ms2mg_converter.errors import DETERMINISTIC_EXIT_CODES
from ms2mg_operator.api.v1alpha1 import (
    API_VERSION,
    KIND,
    CheckpointConversion,
    CheckpointConversionSpec,
    ObjectMeta,
)
from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.keys import (
    APP_NAME,
    COMPONENT,
    COMPONENT_LABEL,
    DEFAULT_CONTAINER_ANNOTATION,
    INSTANCE_LABEL,
    KUEUE_QUEUE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
)

Manifest = dict[str, object]

CONTAINER_NAME = "convert"
SOURCE_MOUNT = "/mnt/source"
DESTINATION_MOUNT = "/mnt/destination"
TMP_MOUNT = "/tmp"
CONFIG_MOUNT = "/etc/ms2mg/model-config"
CONFIG_FILE = "model.yaml"
TERMINATION_LOG = "/dev/termination-log"
MAX_NAME = 63
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _digest(text: str, size: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def label_value(text: str) -> str:
    """`text` when it is a valid label value, else a shortened form ending in a hash of it."""
    if len(text) <= MAX_NAME and _LABEL_VALUE.match(text):
        return text
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[: MAX_NAME - 9].strip("-_.")
    return f"{stem}-{_digest(text)}" if stem else _digest(text)


def job_name(meta: ObjectMeta) -> str:
    """Deterministic Job name of one generation: `<name>-g<generation>-<hash>`, at most 63 characters.

    The hash covers namespace, name, uid and generation, so a re-created resource of the same name never
    collides with a Job of its predecessor that garbage collection has not removed yet."""
    suffix = f"-g{meta.generation}-{_digest(f'{meta.namespace}/{meta.name}/{meta.uid}/{meta.generation}')}"
    base = re.sub(r"[^a-z0-9-]", "-", meta.name)[: MAX_NAME - len(suffix)].strip("-")
    return (base or "conversion") + suffix


def labels(meta: ObjectMeta, settings: OperatorSettings) -> dict[str, str]:
    """Labels of the Job and its pods; the uid label is what the operator's watches select on."""
    keys = settings.keys
    return {
        NAME_LABEL: APP_NAME,
        COMPONENT_LABEL: COMPONENT,
        INSTANCE_LABEL: label_value(meta.name),
        MANAGED_BY_LABEL: MANAGED_BY,
        keys.conversion: label_value(meta.name),
        keys.conversion_uid: meta.uid,
        keys.generation: str(meta.generation),
    }


def mounted_path(mount: str, relative: str) -> str:
    """`relative` (already validated) below `mount`; refuses anything that would leave the mount point."""
    joined = posixpath.normpath(posixpath.join(mount, relative))
    if relative.startswith("/") or not joined.startswith(mount + "/"):
        raise ValueError(f"path {relative!r} leaves the volume mounted at {mount}")
    return joined


def _model_args(spec: CheckpointConversionSpec) -> list[str]:
    if spec.model is None:
        return []
    args: list[str] = []
    for name, value in spec.model.model_dump(exclude_none=True).items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


def _parallel_args(spec: CheckpointConversionSpec) -> list[str]:
    args = ["--target-tensor-parallel-size", str(spec.parallelism.tensor),
            "--target-pipeline-parallel-size", str(spec.parallelism.pipeline)]
    for name, value in spec.parallelism.to_layout().model_dump(exclude_none=True).items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    if spec.parallelism.expert != 1:
        args += ["--target-expert-parallel-size", str(spec.parallelism.expert)]
    if spec.parallelism.expert_tensor is not None:
        args += ["--target-expert-tensor-parallel-size", str(spec.parallelism.expert_tensor)]
    return args


def _moe_args(spec: CheckpointConversionSpec) -> list[str]:
    """MoeSpec fields are named as their `--moe-*` flags."""
    if spec.moe is None:
        return []
    args: list[str] = []
    for name, value in spec.moe.model_dump(exclude_none=True).items():
        flag = "moe-" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [f"--{flag}"] if value else ([] if name == "grouped_gemm" else [f"--no-{flag}"])
        else:
            args += [f"--{flag}", str(value)]
    return args


def _source_args(spec: CheckpointConversionSpec) -> list[str]:
    """The YAML and the layouts the tensors cannot tell."""
    args: list[str] = []
    if spec.config is not None and spec.config.path is not None:
        args += ["--config", mounted_path(SOURCE_MOUNT, spec.config.path)]
    elif spec.config is not None:
        args += ["--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"]
    layouts = spec.layouts
    if layouts is not None and layouts.qkv is not None:
        args += ["--qkv-layout", layouts.qkv.value]
    if layouts is not None and layouts.fc1 is not None:
        args += ["--fc1-layout", layouts.fc1.value]
    if layouts is not None and layouts.source_tensor_parallel is not None:
        args += ["--source-tensor-parallel-size", str(layouts.source_tensor_parallel)]
    if spec.source.strategy is not None:
        args += ["--src-strategy", mounted_path(SOURCE_MOUNT, spec.source.strategy)]
    if spec.source.ckpt_suffix is not None:
        args += ["--src-ckpt-suffix", spec.source.ckpt_suffix]
    return args


def convert_args(spec: CheckpointConversionSpec) -> list[str]:
    """`ms2mg convert` arguments (after the command) for a spec; flag names are those of cliargs.py."""
    args = [
        "convert",
        "--load-dir", mounted_path(SOURCE_MOUNT, spec.source.path),
        "--save-dir", mounted_path(DESTINATION_MOUNT, spec.destination.path),
        "--load-root", SOURCE_MOUNT,
        "--save-root", DESTINATION_MOUNT,
        *_parallel_args(spec),
        *_model_args(spec),
        *_moe_args(spec),
        *_source_args(spec),
    ]
    if spec.vocab.true_size is not None:
        args += ["--true-vocab-size", str(spec.vocab.true_size)]
    args += ["--make-vocab-size-divisible-by", str(spec.vocab.make_divisible_by),
             "--vocab-pad-fill", spec.vocab.pad_fill.value]
    args += ["--ckpt-format", spec.output.format.value]
    args += ["--dtype", spec.dtype.value, "--saver-transformer-impl", spec.transformer_impl.value,
             "--source-digest", spec.source_digest.value]
    if not spec.final_norm_extra_state:
        args.append("--no-final-norm-extra-state")
    for pattern in spec.ignore_keys or ():
        args += ["--ignore-keys", pattern]
    if spec.allow_nonfinite:
        args.append("--allow-nonfinite")
    args += ["--progress", "json", "--result-file", TERMINATION_LOG]
    if not spec.verify:
        args.append("--no-verify")
    if spec.overwrite:
        args.append("--overwrite")
    return args


def _volumes(spec: CheckpointConversionSpec,
             settings: OperatorSettings) -> tuple[list[Manifest], list[Manifest]]:
    """Volumes and mounts; one volume mounted twice when source and destination share a claim."""
    tmp: Manifest = {"name": "tmp", "emptyDir": {"sizeLimit": settings.tmp_size_limit}}
    mounts: list[Manifest] = [
        {"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True},
        {"name": "destination", "mountPath": DESTINATION_MOUNT},
        {"name": "tmp", "mountPath": TMP_MOUNT},
    ]
    extra: list[Manifest] = []
    if spec.config is not None and spec.config.config_map is not None:
        ref = spec.config.config_map
        extra.append({"name": "model-config", "configMap": {"name": ref.name, "optional": False,
                                                            "items": [{"key": ref.key, "path": CONFIG_FILE}]}})
        mounts.append({"name": "model-config", "mountPath": CONFIG_MOUNT, "readOnly": True})
    if spec.source.pvc == spec.destination.pvc:
        mounts[0]["name"] = mounts[1]["name"] = "data"
        claim: Manifest = {"name": "data", "persistentVolumeClaim": {"claimName": spec.source.pvc}}
        return [claim, tmp, *extra], mounts
    return [
        {"name": "source", "persistentVolumeClaim": {"claimName": spec.source.pvc, "readOnly": True}},
        {"name": "destination", "persistentVolumeClaim": {"claimName": spec.destination.pvc}},
        tmp, *extra,
    ], mounts


def _container(spec: CheckpointConversionSpec, settings: OperatorSettings,
               mounts: list[Manifest]) -> Manifest:
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": spec.image or settings.converter_image,
        "command": ["ms2mg"],
        "args": convert_args(spec),
        "env": [{"name": "HOME", "value": TMP_MOUNT}, {"name": "TMPDIR", "value": TMP_MOUNT},
                {"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "resources": spec.resources if spec.resources is not None else settings.default_resources,
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if settings.image_pull_policy is not None:
        container["imagePullPolicy"] = settings.image_pull_policy
    return container


def _pod_spec(spec: CheckpointConversionSpec, settings: OperatorSettings) -> Manifest:
    volumes, mounts = _volumes(spec, settings)
    pod: Manifest = {
        "restartPolicy": "Never",
        "serviceAccountName": spec.service_account_name or settings.converter_service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "fsGroup": settings.fs_group,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(spec, settings, mounts)],
        "volumes": volumes,
    }
    optional: dict[str, object] = {
        "nodeSelector": spec.node_selector,
        "tolerations": spec.tolerations,
        "affinity": spec.affinity,
        "priorityClassName": spec.priority_class_name,
        "imagePullSecrets": None if spec.image_pull_secrets is None
        else [ref.model_dump() for ref in spec.image_pull_secrets],
    }
    pod.update({k: v for k, v in optional.items() if v is not None})
    return pod


def pod_failure_policy() -> Manifest:
    """Disruptions (eviction, preemption) never count; bad input (exit codes 2-5) fails the Job at once."""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                                              "values": sorted(int(c) for c in DETERMINISTIC_EXIT_CODES)}},
    ]}


def owner_reference(meta: ObjectMeta) -> Manifest:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta.name, "uid": meta.uid,
            "controller": True, "blockOwnerDeletion": True}


def render_job(conversion: CheckpointConversion, settings: OperatorSettings) -> Manifest:
    """The complete Job manifest of the resource's current generation."""
    meta, spec = conversion.metadata, conversion.spec
    pod_labels = labels(meta, settings)
    job_labels = dict(pod_labels)
    job_spec: Manifest = {
        "backoffLimit": settings.default_backoff_limit if spec.backoff_limit is None else spec.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {"labels": pod_labels, "annotations": {
                DEFAULT_CONTAINER_ANNOTATION: CONTAINER_NAME,
                settings.keys.conversion_name: meta.name}},
            "spec": _pod_spec(spec, settings),
        },
    }
    ttl = spec.ttl_seconds_after_finished
    deadline = spec.active_deadline_seconds
    ttl = settings.default_ttl_seconds_after_finished if ttl is None else ttl
    deadline = settings.default_active_deadline_seconds if deadline is None else deadline
    if ttl is not None:
        job_spec["ttlSecondsAfterFinished"] = ttl
    if deadline is not None:
        job_spec["activeDeadlineSeconds"] = deadline
    if spec.queue_name is not None:
        job_labels[KUEUE_QUEUE_LABEL] = spec.queue_name
        job_spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(meta), "namespace": meta.namespace, "labels": job_labels,
                     "ownerReferences": [owner_reference(meta)]},
        "spec": job_spec,
    }
