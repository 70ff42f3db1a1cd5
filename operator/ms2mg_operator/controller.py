"""What the operator does for one `CheckpointConversion`: admit it and run its Job (`reconcile`), follow the Job
(`sync`), and the periodic work of the poller (`poll`). No kopf here: the handlers call these functions and
translate their errors.

Every status write goes through `_commit` under a per-resource lock, after a fresh GET of the resource, so
the create/update handlers, the Job and pod watches and the poller never overwrite each other with stale
conditions. Writes are merge-patches of `.status` holding the whole conditions list. After each derivation
`_schedule` tells the poller what the resource needs: progress reads while a pod runs, re-checks while it
waits, nothing otherwise.

A new generation never runs beside an older one: the older generations' Jobs are deleted in the foreground, and
the new Job is created only once they are gone and no pod of theirs is left (`Accepted=False
WaitingForPreviousJob` meanwhile; their Job and pod deletion events bring the next check).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from ms2mg_operator.admission import admission_problem, policy_problem
from ms2mg_operator.api.v1alpha1 import (
    API_VERSION,
    KIND,
    CheckpointConversion,
    CheckpointConversionSpec,
    CheckpointConversionStatus,
    ConditionType,
    ObjectMeta,
    Phase,
)
from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.jobs import CONTAINER_NAME, job_name, render_job
from ms2mg_operator.kube import JobOwnershipError, KubeClient, PermanentApiError
from ms2mg_operator.metrics import Metrics
from ms2mg_operator.observe import (
    JobInfo,
    Observation,
    PodInfo,
    job_info,
    last_progress,
    newest_pod,
    pod_info,
)
from ms2mg_operator.poller import Entry, Key, Poller, Task
from ms2mg_operator.status import (
    Acceptance,
    Reason,
    acceptance_changed,
    awaits_recheck,
    defaulted_note,
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
    poller: Poller = field(init=False)
    _locks: tuple[threading.Lock, ...] = field(
        default_factory=lambda: tuple(threading.Lock() for _ in range(LOCK_STRIPES)))

    def __post_init__(self) -> None:
        self.poller = Poller({Task.PROGRESS: self.settings.progress_seconds,
                              Task.RECHECK: self.settings.recheck_seconds})

    def lock(self, namespace: str, name: str) -> threading.Lock:
        """A lock per resource (striped: bounded memory, rare harmless sharing)."""
        return self._locks[hash((namespace, name)) % LOCK_STRIPES]


def parse_status(body: Obj) -> CheckpointConversionStatus | None:
    """The stored status, or None when there is none or it cannot be read (it is then rebuilt)."""
    raw = body.get("status")
    if not isinstance(raw, Mapping) or not raw:
        return None
    try:
        return CheckpointConversionStatus.model_validate(raw)
    except ValidationError:
        logger.warning("Ignoring an unreadable status of %s", _get(body, "metadata", "name"))
        return None


def _get(obj: object, *path: str) -> object:
    for key in path:
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def _involved(meta: ObjectMeta) -> dict[str, object]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta.name, "namespace": meta.namespace,
            "uid": meta.uid}


def _schedule(ctx: Context, meta: ObjectMeta, new: CheckpointConversionStatus, running_pod: str | None) -> None:
    """Tell the poller what the resource needs now (see poller.py)."""
    key = (meta.namespace, meta.name)
    if awaits_recheck(new, meta.generation):
        ctx.poller.want(key, Task.RECHECK, meta.uid)
    elif new.phase == Phase.RUNNING and new.observed_generation == meta.generation:
        ctx.poller.want(key, Task.PROGRESS, meta.uid, running_pod)  # no pod named: keep the one scheduled
    else:
        ctx.poller.forget(key)


def _commit(ctx: Context, meta: ObjectMeta, previous: CheckpointConversionStatus | None,
            new: CheckpointConversionStatus, running_pod: str | None = None) -> None:
    """Schedule the follow-up; write the status if it changed; post Events and count outcomes on transitions."""
    _schedule(ctx, meta, new, running_pod)
    if previous is not None and new == previous:
        return
    status = new.model_dump(mode="json", by_alias=True)
    if not ctx.kube.patch_conversion_status(meta.namespace, meta.name, status):
        ctx.poller.forget((meta.namespace, meta.name))
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
    if succeeded and new.result is not None and new.result.defaulted:
        ctx.kube.emit_event(_involved(meta), "Warning", "ModelFactsDefaulted", defaulted_note(new.result.defaulted))


def _reject(ctx: Context, meta: ObjectMeta, previous: CheckpointConversionStatus | None,
            reason: str, message: str) -> None:
    new = derive_status(previous, generation=meta.generation, now=ctx.clock(),
                        acceptance=Acceptance(False, reason, message))
    _commit(ctx, meta, previous, new)


def _older_runs(ctx: Context, meta: ObjectMeta) -> list[str]:
    """What is left of earlier generations: their Jobs (deleted here, in the foreground, if they are not being
    deleted already) and, once those are gone, any of their pods that has not finished."""
    current, keys = job_name(meta), ctx.settings.keys
    left: list[str] = []
    for job in ctx.kube.list_jobs(meta.namespace, keys.conversion_uid, meta.uid):
        name = str(_get(job, "metadata", "name") or "")
        if not name or name == current:
            continue
        if not _get(job, "metadata", "deletionTimestamp"):
            logger.info("Deleting Job %s/%s of an earlier generation of %s", meta.namespace, name, meta.name)
            ctx.kube.delete_job(meta.namespace, name)
        left.append(f"Job {name}")
    if left or meta.generation == 1:  # a first generation has no predecessors (a re-created resource: new uid)
        return left
    for pod in ctx.kube.list_pods(meta.namespace, keys.conversion_uid, meta.uid):
        info = pod_info(pod, CONTAINER_NAME, keys)
        if info.generation != meta.generation and not info.finished:
            left.append(f"pod {info.name}")
    return left


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
    pods = ctx.kube.list_pods(meta.namespace, ctx.settings.keys.conversion_uid, meta.uid) if adopted else []
    observation = _observe(ctx, meta, spec, [job_info(job)],
                           [pod_info(p, CONTAINER_NAME, ctx.settings.keys) for p in pods], None, read_log=adopted)
    new = derive_status(previous, generation=meta.generation, now=ctx.clock(), acceptance=acceptance,
                        observation=observation)
    running = observation.pod.name if observation.pod and observation.pod.phase == "Running" else None
    _commit(ctx, meta, previous, new, running)


def reconcile(ctx: Context, namespace: str, name: str) -> None:
    """Bring the resource's current generation to a running (or recorded) state. Idempotent."""
    with ctx.lock(namespace, name):
        body = ctx.kube.get_conversion(namespace, name)
        if body is None:
            ctx.poller.forget((namespace, name))
            return
        _reconcile(ctx, body)


def _reconcile(ctx: Context, body: Obj) -> None:
    if _get(body, "metadata", "deletionTimestamp"):
        return
    meta = ObjectMeta.model_validate(body.get("metadata"))
    previous = parse_status(body)
    if is_terminal(previous, meta.generation):
        ctx.poller.forget((meta.namespace, meta.name))
        return
    older = _older_runs(ctx, meta)  # first: even a rejected new spec stops the outdated Job
    try:
        spec = CheckpointConversionSpec.model_validate(body.get("spec"))
    except ValidationError as e:
        _reject(ctx, meta, previous, Reason.INVALID_SPEC, _validation_message(e))
        return
    conv = CheckpointConversion(metadata=meta, spec=spec, status=previous or CheckpointConversionStatus())
    if is_accepted(previous, meta.generation) and previous and previous.job_name == job_name(meta):
        _follow_recorded_job(ctx, conv)
        return
    problem = policy_problem(spec, ctx.settings) if older else admission_problem(ctx.kube, ctx.settings, conv)
    if problem is None and older:
        problem = Reason.WAITING_FOR_PREVIOUS_JOB, (
            f"generation {meta.generation} starts when nothing of the earlier ones runs any more; waiting for "
            f"{', '.join(older)} to be gone (deleted in the foreground)")
    if problem is not None:
        _reject(ctx, meta, previous, *problem)
        return
    _start_job(ctx, conv)


def _follow_recorded_job(ctx: Context, conv: CheckpointConversion) -> None:
    """The Job was created before (e.g. before a restart): follow it with its pods as they are now (no watch
    event may come for a pod that just keeps running), or record that it disappeared."""
    meta, name = conv.metadata, job_name(conv.metadata)
    job = ctx.kube.get_job(meta.namespace, name)
    pods = [] if job is None else ctx.kube.list_pods(meta.namespace, ctx.settings.keys.conversion_uid, meta.uid)
    observation = _observe(ctx, meta, conv.spec, [] if job is None else [job_info(job)],
                           [pod_info(p, CONTAINER_NAME, ctx.settings.keys) for p in pods],
                           deleted_job=name if job is None else None, read_log=True)
    new = derive_status(conv.status, generation=meta.generation, now=ctx.clock(), observation=observation)
    running = observation.pod.name if observation.pod and observation.pod.phase == "Running" else None
    _commit(ctx, meta, conv.status, new, running)


def _validation_message(error: ValidationError) -> str:
    parts = [f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in error.errors()]
    return "; ".join(parts)[:2048]


def sync(ctx: Context, namespace: str, name: str, uid: str, jobs: Sequence[JobInfo], pods: Sequence[PodInfo],
         deleted_job: str | None = None) -> None:
    """Derive and write the status from the generation's Job and newest pod (and its progress line), given the
    resource's Jobs and pods as the watches show them (`deleted_job`: a Job just seen deleted)."""
    with ctx.lock(namespace, name):
        body = ctx.kube.get_conversion(namespace, name)
        if body is None:
            ctx.poller.forget((namespace, name))
            return
        if _get(body, "metadata", "uid") != uid:
            return
        meta = ObjectMeta.model_validate(body.get("metadata"))
        previous = parse_status(body)
        if awaits_recheck(previous, meta.generation):  # e.g. an older generation's Job or pod just went away
            _reconcile(ctx, body)
            return
        try:
            spec = CheckpointConversionSpec.model_validate(body.get("spec"))
        except ValidationError:
            return  # reconcile reports invalid specs
        if not is_accepted(previous, meta.generation):
            return
        observation = _observe(ctx, meta, spec, jobs, pods, deleted_job,
                               read_log=not is_terminal(previous, meta.generation))
        new = derive_status(previous, generation=meta.generation, now=ctx.clock(), observation=observation)
        running = observation.pod.name if observation.pod and observation.pod.phase == "Running" else None
        _commit(ctx, meta, previous, new, running)


def _observe(ctx: Context, meta: ObjectMeta, spec: CheckpointConversionSpec, jobs: Sequence[JobInfo],
             pods: Sequence[PodInfo], deleted_job: str | None, *, read_log: bool) -> Observation:
    """What the generation's Job and newest pod show. The pod log is read for the progress line while the
    container runs, and once more when it has terminated (until the status is terminal), so that the final
    progress ("112/112") is recorded rather than the last value the poller happened to see."""
    expected = job_name(meta)
    job = next((j for j in jobs if j.name == expected), None)
    pod = newest_pod([p for p in pods if p.generation == meta.generation])
    progress = None
    if pod is not None and read_log and pod.phase in ("Running", "Succeeded", "Failed"):
        progress = last_progress(ctx.kube.read_log_tail(meta.namespace, pod.name, CONTAINER_NAME,
                                                        ctx.settings.log_tail_lines))
    return Observation(job=job, job_deleted=job is None and deleted_job == expected, pod=pod,
                       progress=progress, verify=spec.verify, queued=spec.queue_name is not None)


def refresh_progress(ctx: Context, namespace: str, name: str, uid: str, pod: str) -> None:
    """The poller's progress read: the running pod's last progress line into `status.progress`."""
    with ctx.lock(namespace, name):
        body = ctx.kube.get_conversion(namespace, name)
        if body is None or _get(body, "metadata", "uid") != uid:
            ctx.poller.forget((namespace, name))
            return
        meta = ObjectMeta.model_validate(body.get("metadata"))
        previous = parse_status(body)
        if previous is None or previous.phase != Phase.RUNNING or previous.observed_generation != meta.generation:
            _schedule(ctx, meta, previous or CheckpointConversionStatus(), None)
            return
        tail = ctx.kube.read_log_tail(namespace, pod, CONTAINER_NAME, ctx.settings.log_tail_lines)
        progress = last_progress(tail)
        if progress is None:
            return
        new = derive_status(previous, generation=meta.generation, now=ctx.clock(),
                            observation=Observation(job=None, progress=progress))
        _commit(ctx, meta, previous, new, pod)


def poll(ctx: Context, key: Key, entry: Entry) -> None:
    """One due entry of the poller."""
    namespace, name = key
    if entry.task == Task.PROGRESS and entry.pod is not None:
        refresh_progress(ctx, namespace, name, entry.uid, entry.pod)
    else:
        reconcile(ctx, namespace, name)
