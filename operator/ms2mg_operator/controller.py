"""What the operator does for one `CheckpointConversion`: admit it and run its Job (`reconcile`), and follow
the Job (`sync`). No kopf here: the handlers call these functions and translate their errors.

Every status write goes through `_commit` under a per-resource lock, after a fresh GET of the resource, so
the create/update handlers, the Job and pod watches and the timer never overwrite each other with stale
conditions. Writes are merge-patches of `.status` holding the whole conditions list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from ms2mg_converter.checks import parallelism_problems
from ms2mg_converter.config import ModelOverrides
from ms2mg_operator.api.v1alpha1 import (
    API_VERSION,
    KIND,
    CheckpointConversion,
    CheckpointConversionSpec,
    CheckpointConversionStatus,
    ConditionType,
    ObjectMeta,
    paths_overlap,
)
from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.jobs import CONTAINER_NAME, job_name, render_job
from ms2mg_operator.kube import JobOwnershipError, KubeClient, PermanentApiError
from ms2mg_operator.metrics import Metrics
from ms2mg_operator.observe import Observation, job_info, last_progress, newest_pod, pod_info
from ms2mg_operator.status import (
    Acceptance,
    Reason,
    acceptance_changed,
    derive_status,
    is_accepted,
    is_terminal,
    terminal_transition,
)

logger = logging.getLogger(__name__)

Obj = Mapping[str, object]
LOCK_STRIPES = 64


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Context:
    """Everything the controller needs; one per operator process (kept in kopf's memo)."""

    kube: KubeClient
    settings: OperatorSettings
    metrics: Metrics
    clock: Callable[[], datetime] = utc_now
    _locks: tuple[threading.Lock, ...] = field(
        default_factory=lambda: tuple(threading.Lock() for _ in range(LOCK_STRIPES)))

    def lock(self, namespace: str, name: str) -> threading.Lock:
        """A lock per resource (striped: bounded memory, rare harmless sharing)."""
        return self._locks[hash((namespace, name)) % LOCK_STRIPES]


@dataclass(frozen=True)
class Observed:
    """Job and pod dicts of one resource (from the kopf indexes) and a Job just seen deleted."""

    jobs: Sequence[Obj] = ()
    pods: Sequence[Obj] = ()
    deleted_job: str | None = None


def parse_status(body: Obj) -> CheckpointConversionStatus | None:
    """The stored status, or None when there is none or it cannot be read (it is then rebuilt)."""
    raw = body.get("status")
    if not isinstance(raw, Mapping) or not raw:
        return None
    try:
        return CheckpointConversionStatus.model_validate(raw)
    except ValidationError:
        logger.warning("Ignoring an unreadable status of %s", _meta_name(body))
        return None


def _meta_name(body: Obj) -> str:
    meta = body.get("metadata")
    return str(meta.get("name")) if isinstance(meta, Mapping) else "?"


def _involved(meta: ObjectMeta) -> dict[str, object]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta.name, "namespace": meta.namespace,
            "uid": meta.uid}


def _commit(ctx: Context, meta: ObjectMeta, previous: CheckpointConversionStatus | None,
            new: CheckpointConversionStatus) -> None:
    """Write the status if it changed; post Events and count outcomes on transitions."""
    if previous is not None and new == previous:
        return
    status = new.model_dump(mode="json", by_alias=True)
    if not ctx.kube.patch_conversion_status(meta.namespace, meta.name, status):
        return
    changed = acceptance_changed(previous, new)
    if changed is not None:
        kind = "Normal" if changed.status == "True" else "Warning"
        ctx.kube.emit_event(_involved(meta), kind, changed.reason, changed.message)
        if changed.reason == Reason.JOB_CREATED:
            ctx.metrics.jobs_created.inc()
    outcome = terminal_transition(previous, new, meta.generation)
    if outcome is not None:
        _record_outcome(ctx, meta, new, outcome)


def _record_outcome(ctx: Context, meta: ObjectMeta, new: CheckpointConversionStatus,
                    outcome: ConditionType) -> None:
    cond = new.condition(outcome)
    reason = cond.reason if cond is not None else str(outcome)
    succeeded = outcome == ConditionType.SUCCEEDED
    seconds = new.result.seconds if new.result is not None and new.result.seconds else None
    if seconds is None and new.start_time is not None and new.completion_time is not None:
        seconds = (new.completion_time - new.start_time).total_seconds()
    ctx.metrics.record_outcome(succeeded=succeeded, reason=reason, seconds=seconds,
                               written_bytes=new.result.bytes if new.result is not None else None)
    message = cond.message if cond is not None else ""
    ctx.kube.emit_event(_involved(meta), "Normal" if succeeded else "Warning", reason, message)


def _reject(ctx: Context, meta: ObjectMeta, previous: CheckpointConversionStatus | None,
            reason: str, message: str) -> None:
    new = derive_status(previous, generation=meta.generation, now=ctx.clock(),
                        acceptance=Acceptance(False, reason, message))
    _commit(ctx, meta, previous, new)


def _destination_conflict(ctx: Context, conv: CheckpointConversion) -> str | None:
    """The name of an older resource of the namespace writing an overlapping destination, if any."""
    mine = conv.spec.destination
    created = conv.metadata.creation_timestamp or utc_now()
    for other in ctx.kube.list_conversions(conv.metadata.namespace):
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


def admission_problem(ctx: Context, conv: CheckpointConversion) -> tuple[str, str] | None:
    """Why the resource cannot run now (reason, message), checked cheapest first; None when it can."""
    spec, settings = conv.spec, ctx.settings
    image = spec.image or settings.converter_image
    if settings.allowed_images and not any(image.startswith(p) for p in settings.allowed_images):
        return Reason.IMAGE_NOT_ALLOWED, (f"image {image} does not start with an allowed prefix "
                                          f"({', '.join(settings.allowed_images)})")
    model = spec.model.to_overrides() if spec.model is not None else ModelOverrides()
    problems = parallelism_problems(model, spec.parallelism.tensor, spec.parallelism.pipeline)
    if problems:
        return Reason.PARALLELISM_MISMATCH, "; ".join(problems)
    other = _destination_conflict(ctx, conv)
    if other is not None:
        return Reason.DESTINATION_CONFLICT, (
            f"destination {spec.destination.pvc}:{spec.destination.path} is also written by the older "
            f"CheckpointConversion {other}; this one starts when that one is deleted")
    for reason, pvc in ((Reason.SOURCE_PVC_NOT_FOUND, spec.source.pvc),
                        (Reason.DESTINATION_PVC_NOT_FOUND, spec.destination.pvc)):
        if not ctx.kube.pvc_exists(conv.metadata.namespace, pvc):
            return reason, f"PersistentVolumeClaim {conv.metadata.namespace}/{pvc} does not exist"
    return None


def _remove_stale_jobs(ctx: Context, meta: ObjectMeta) -> None:
    """Delete this resource's Jobs of other generations (a spec change stops the running Job)."""
    current = job_name(meta)
    uid_label = f"{ctx.settings.label_prefix}/conversion-uid"
    for job in ctx.kube.list_jobs(meta.namespace, uid_label, meta.uid):
        name = str(_get(job, "metadata", "name") or "")
        if name and name != current:
            logger.info("Deleting Job %s/%s of an earlier generation of %s", meta.namespace, name, meta.name)
            ctx.kube.delete_job(meta.namespace, name)


def _get(obj: object, *path: str) -> object:
    for key in path:
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def _start_job(ctx: Context, conv: CheckpointConversion) -> None:
    """Create or adopt the generation's Job and record it (Accepted=True)."""
    meta, spec = conv.metadata, conv.spec
    previous = conv.status if conv.status.observed_generation is not None else None
    try:
        job, adopted = ctx.kube.create_or_adopt_job(render_job(conv, ctx.settings), meta.uid)
    except JobOwnershipError as e:
        _reject(ctx, meta, previous, Reason.JOB_NAME_CONFLICT, str(e))
        return
    except PermanentApiError as e:
        _reject(ctx, meta, previous, Reason.JOB_REJECTED, f"the API server refused the Job: {e}")
        return
    name = job_name(meta)
    reason = Reason.JOB_ADOPTED if adopted else Reason.JOB_CREATED
    acceptance = Acceptance(True, reason, f"Job {name} {'adopted' if adopted else 'created'} for "
                                          f"generation {meta.generation}.")
    observation = Observation(job=job_info(job, ctx.settings.label_prefix), verify=spec.verify,
                              queued=spec.queue_name is not None)
    new = derive_status(previous, generation=meta.generation, now=ctx.clock(), acceptance=acceptance,
                        observation=observation)
    _commit(ctx, meta, previous, new)


def reconcile(ctx: Context, namespace: str, name: str) -> None:
    """Bring the resource's current generation to a running (or recorded) state. Idempotent."""
    with ctx.lock(namespace, name):
        body = ctx.kube.get_conversion(namespace, name)
        if body is None or _get(body, "metadata", "deletionTimestamp"):
            return
        meta = ObjectMeta.model_validate(body.get("metadata"))
        previous = parse_status(body)
        if is_terminal(previous, meta.generation):
            return
        _remove_stale_jobs(ctx, meta)
        try:
            spec = CheckpointConversionSpec.model_validate(body.get("spec"))
        except ValidationError as e:
            _reject(ctx, meta, previous, Reason.INVALID_SPEC, _validation_message(e))
            return
        conv = CheckpointConversion(metadata=meta, spec=spec,
                                    status=previous or CheckpointConversionStatus())
        if is_accepted(previous, meta.generation) and previous and previous.job_name == job_name(meta):
            _follow_recorded_job(ctx, conv)
            return
        problem = admission_problem(ctx, conv)
        if problem is not None:
            _reject(ctx, meta, previous, *problem)
            return
        _start_job(ctx, conv)


def _follow_recorded_job(ctx: Context, conv: CheckpointConversion) -> None:
    """The Job was created before (e.g. before a restart): adopt it, or record that it disappeared."""
    meta = conv.metadata
    job = ctx.kube.get_job(meta.namespace, job_name(meta))
    observation = Observation(job=None if job is None else job_info(job, ctx.settings.label_prefix),
                              job_deleted=job is None, verify=conv.spec.verify,
                              queued=conv.spec.queue_name is not None)
    new = derive_status(conv.status, generation=meta.generation, now=ctx.clock(), observation=observation)
    _commit(ctx, meta, conv.status, new)


def _validation_message(error: ValidationError) -> str:
    parts = [f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in error.errors()]
    return "; ".join(parts)[:2048]


def sync(ctx: Context, namespace: str, name: str, uid: str, observed: Observed) -> None:
    """Derive and write the status from the generation's Job and newest pod (and its progress line)."""
    with ctx.lock(namespace, name):
        body = ctx.kube.get_conversion(namespace, name)
        if body is None:
            return
        try:
            meta = ObjectMeta.model_validate(body.get("metadata"))
            spec = CheckpointConversionSpec.model_validate(body.get("spec"))
        except ValidationError:
            return  # reconcile reports invalid specs
        if meta.uid != uid:
            return
        previous = parse_status(body)
        if not is_accepted(previous, meta.generation):
            return
        observation = _observe(ctx, meta, spec, observed, read_log=not is_terminal(previous, meta.generation))
        new = derive_status(previous, generation=meta.generation, now=ctx.clock(), observation=observation)
        _commit(ctx, meta, previous, new)


def _observe(ctx: Context, meta: ObjectMeta, spec: CheckpointConversionSpec, observed: Observed, *,
             read_log: bool = True) -> Observation:
    """What the generation's Job and newest pod show. The pod log is read for the progress line while the
    container runs, and once more when it has terminated (until the status is terminal), so that the final
    progress ("112/112") is recorded rather than the last value a timer happened to see."""
    expected = job_name(meta)
    prefix = ctx.settings.label_prefix
    job = next((job_info(j, prefix) for j in observed.jobs if _get(j, "metadata", "name") == expected), None)
    gen_label = f"{prefix}/generation"
    pods = [pod_info(p, CONTAINER_NAME) for p in observed.pods
            if _get(p, "metadata", "labels", gen_label) == str(meta.generation)]
    pod = newest_pod(pods)
    progress = None
    if pod is not None and read_log and pod.phase in ("Running", "Succeeded", "Failed"):
        tail = ctx.kube.read_log_tail(meta.namespace, pod.name, CONTAINER_NAME, ctx.settings.log_tail_lines)
        progress = last_progress(tail)
    return Observation(job=job, job_deleted=job is None and observed.deleted_job == expected, pod=pod,
                       progress=progress, verify=spec.verify, queued=spec.queue_name is not None)
