"""Whether a valid resource may start its Job now: the checks after schema validation, cheapest first.

* the image and the ServiceAccount must be on the operator's allow-lists (whoever may create a
  CheckpointConversion can otherwise run any image, as any ServiceAccount of the namespace);
* TP/PP must divide the model (the converter's own torch-free check);
* no older resource of the namespace may write an overlapping destination on the same claim;
* both PersistentVolumeClaims must exist.

The first two need a spec change (`Stalled`); the last two clear up by themselves and are checked again
(`status.RECHECK_REASONS`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import ValidationError

from ms2mg_converter.checks import parallelism_problems
from ms2mg_converter.config import ModelOverrides
from ms2mg_operator.api.v1alpha1 import CheckpointConversion, CheckpointConversionSpec, ObjectMeta, paths_overlap
from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.images import image_allowed
from ms2mg_operator.kube import KubeClient
from ms2mg_operator.status import Reason

Problem = tuple[str, str]
"""(reason, message)"""


def policy_problem(spec: CheckpointConversionSpec, settings: OperatorSettings) -> Problem | None:
    """The image or ServiceAccount is not on the operator's allow-list."""
    image = spec.image or settings.converter_image
    patterns = settings.image_patterns
    if not image_allowed(image, patterns):
        allowed = ", ".join(p.text for p in patterns)
        return Reason.IMAGE_NOT_ALLOWED, (f"image {image} is not allowed by the operator (allowed: {allowed}; "
                                          "MS2MG_ALLOWED_IMAGES, the chart's allowedImages)")
    account = spec.service_account_name
    if account is not None and not settings.service_account_allowed(account):
        allowed = ", ".join([settings.converter_service_account, *settings.allowed_service_accounts])
        return Reason.SERVICE_ACCOUNT_NOT_ALLOWED, (
            f"ServiceAccount {account} is not allowed by the operator (allowed: {allowed}; "
            "MS2MG_ALLOWED_SERVICE_ACCOUNTS, the chart's allowedServiceAccounts)")
    return None


def _destination_conflict(kube: KubeClient, conv: CheckpointConversion) -> str | None:
    """The name of an older resource of the namespace writing an overlapping destination, if any."""
    mine = conv.spec.destination
    created = conv.metadata.creation_timestamp or datetime.now(UTC)
    for other in kube.list_conversions(conv.metadata.namespace):
        try:
            meta = ObjectMeta.model_validate(other.get("metadata"))
            spec = CheckpointConversionSpec.model_validate(other.get("spec"))
        except ValidationError:
            continue  # an invalid resource never runs, so it claims nothing
        if meta.uid == conv.metadata.uid or spec.destination.pvc != mine.pvc:
            continue
        theirs = (meta.creation_timestamp or created, meta.name)
        if paths_overlap(spec.destination.path, mine.path) and theirs < (created, conv.metadata.name):
            return meta.name
    return None


def admission_problem(kube: KubeClient, settings: OperatorSettings, conv: CheckpointConversion) -> Problem | None:
    """Why the resource cannot run now (reason, message); None when it can."""
    spec = conv.spec
    problem = policy_problem(spec, settings)
    if problem is not None:
        return problem
    model = spec.model.to_overrides() if spec.model is not None else ModelOverrides()
    problems = parallelism_problems(model, spec.parallelism.tensor, spec.parallelism.pipeline,
                                    spec.parallelism.to_layout())
    if problems:
        return Reason.PARALLELISM_MISMATCH, "; ".join(problems)
    other = _destination_conflict(kube, conv)
    if other is not None:
        return Reason.DESTINATION_CONFLICT, (
            f"destination {spec.destination.pvc}:{spec.destination.path} is also written by the older "
            f"CheckpointConversion {other}; this one starts when that one is deleted")
    for reason, pvc in ((Reason.SOURCE_PVC_NOT_FOUND, spec.source.pvc),
                        (Reason.DESTINATION_PVC_NOT_FOUND, spec.destination.pvc)):
        if not kube.pvc_exists(conv.metadata.namespace, pvc):
            return reason, f"PersistentVolumeClaim {conv.metadata.namespace}/{pvc} does not exist"
    return None
