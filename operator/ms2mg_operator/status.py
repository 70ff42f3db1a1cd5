"""Derive a `CheckpointConversion`'s status from what the operator observed (pure functions).

Conditions follow the Kubernetes API conventions. The stages are kept in the order a conversion reaches them:

    Accepted -> Queued (with spec.queueName) -> Running -> Verified -> Succeeded | Failed

A stage appears when it is reached and disappears when a new generation starts over, so the last entry is always
the latest stage. In front of them, a summary for generic tools (kstatus, Flux, Argo CD): `Ready` (always; True
only once converted), `Reconciling=True` while work is under way and `Stalled=True` when only a spec change can
help (each present only while True), and `status.phase`, one word for the STATUS column. `lastTransitionTime`
changes only when a condition's status changes; every condition carries the generation it describes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from ms2mg_converter.errors import ExitCode
from ms2mg_converter.result import ConversionResult
from ms2mg_operator.api.v1alpha1 import (
    CheckpointConversionStatus,
    Condition,
    ConditionStatus,
    ConditionType,
    ConversionResultStatus,
    Phase,
)
from ms2mg_operator.observe import JobInfo, Observation, PodInfo, parse_result

T, F, U = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN
STAGES = (ConditionType.ACCEPTED, ConditionType.QUEUED, ConditionType.RUNNING, ConditionType.VERIFIED,
          ConditionType.SUCCEEDED, ConditionType.FAILED)
SUMMARY = (ConditionType.READY, ConditionType.RECONCILING, ConditionType.STALLED)
MAX_MESSAGE = 4096
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


class Reason(StrEnum):
    """Reasons the operator itself sets (the converter's reasons pass through)."""

    JOB_CREATED = "JobCreated"
    JOB_ADOPTED = "JobAdopted"
    INVALID_SPEC = "InvalidSpec"
    IMAGE_NOT_ALLOWED = "ImageNotAllowed"
    PARALLELISM_MISMATCH = "ParallelismMismatch"
    DESTINATION_CONFLICT = "DestinationConflict"
    SOURCE_PVC_NOT_FOUND = "SourcePVCNotFound"
    DESTINATION_PVC_NOT_FOUND = "DestinationPVCNotFound"
    JOB_REJECTED = "JobRejected"
    JOB_NAME_CONFLICT = "JobNameConflict"
    SERVICE_ACCOUNT_NOT_ALLOWED = "ServiceAccountNotAllowed"
    WAITING_FOR_PREVIOUS_JOB = "WaitingForPreviousJob"


RECHECK_REASONS = frozenset({Reason.DESTINATION_CONFLICT, Reason.SOURCE_PVC_NOT_FOUND,
                             Reason.DESTINATION_PVC_NOT_FOUND, Reason.WAITING_FOR_PREVIOUS_JOB})
"""Rejections that clear up without a spec change: checked again on the events that may clear them, and every
`MS2MG_RECHECK_SECONDS`."""


@dataclass(frozen=True)
class Acceptance:
    accepted: bool
    reason: str
    message: str


Target = tuple[ConditionStatus, str, str]


def reason_or(value: str | None, fallback: str) -> str:
    """`value` when it is a valid condition reason, else `fallback`."""
    return value if value and len(value) <= 1024 and _REASON.match(value) else fallback


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 12] + " [truncated]"


def _failure(job: JobInfo, pod: PodInfo | None, result: ConversionResult | None) -> tuple[str, str]:
    """Reason and message of a failed Job: the converter's own words when it left a result."""
    if result is not None and result.status == "Failed":
        return (reason_or(result.reason, "ConversionFailed"),
                result.message or f"ms2mg convert exited with code {result.exit_code}.")
    if pod is not None and pod.terminated_reason == "OOMKilled":
        return ("OOMKilled", "The converter was killed for exceeding its memory limit; raise "
                             "spec.resources.limits.memory.")
    reason, message = job.failure or ("JobFailed", "")
    message = message or f"Job {job.name} failed."
    if pod is not None and pod.exit_code is not None:
        message += f" The converter exited with code {pod.exit_code}."
    if pod is not None and pod.termination_message:
        message += f" Last output: {pod.termination_message[-1024:].strip()}"
    return reason_or(reason, "JobFailed"), message


def _running(job: JobInfo, pod: PodInfo | None) -> Target:
    """The Running condition of an active Job, from its newest pod."""
    if pod is None:
        return F, "Pending", f"Waiting for a pod of Job {job.name}."
    if pod.phase == "Running":
        return T, "Converting", f"Pod {pod.name} is converting (progress: status.progress)."
    if pod.phase == "Pending":
        return (F, reason_or(pod.waiting_reason, "PodPending"),
                pod.waiting_message or f"Pod {pod.name} is pending (scheduling, image pull or volume mount).")
    if pod.phase == "Failed":
        code = "" if pod.exit_code is None else f" with exit code {pod.exit_code}"
        return F, "Retrying", f"Pod {pod.name} failed{code}; the Job will retry within its backoffLimit."
    if pod.phase == "Succeeded":
        return F, "Completing", f"Pod {pod.name} finished; waiting for Job {job.name} to complete."
    return U, "PodUnknown", f"The state of pod {pod.name} is unknown."


def _verified(verify: bool, result: ConversionResult | None) -> Target:
    if result is not None and result.verified:
        return T, "Verified", "The written checkpoint was checked against the source."
    if not verify:
        return F, "VerificationSkipped", "spec.verify is false: the output was not checked."
    if result is not None:
        return F, "NotVerified", "The converter reports that the output was not verified."
    return U, "ResultUnavailable", "The converter left no readable result, so verification is unknown."


def defaulted_note(defaulted: list[str]) -> str:
    """What a user must know when the converter set model facts to Megatron's defaults."""
    return (f"Model facts not stated by spec.model, spec.config (the MindFormers YAML) or the naming family were "
            f"set to Megatron's defaults: {', '.join(defaulted)}. If the model was trained with other values the "
            "checkpoint computes wrong outputs: state them and convert again (spec.overwrite).")


def _succeeded(job: JobInfo, result: ConversionResult | None) -> Target:
    if result is not None and result.status == "Succeeded":
        message = result.message or f"Job {job.name} completed."
        if result.defaulted:
            message += " " + defaulted_note(result.defaulted)
        return T, reason_or(result.reason, "Converted"), message
    return T, "JobComplete", f"Job {job.name} completed; the converter left no readable result."


def _suspended(job: JobInfo, obs: Observation, started: bool) -> dict[ConditionType, Target]:
    """A suspended Job: queued, and -- when it had been admitted before -- preempted (Kueue) or suspended."""
    until = "its queue admits it" if obs.queued else "spec.suspend is cleared"
    targets: dict[ConditionType, Target] = {
        ConditionType.QUEUED: (T, "WaitingForAdmission", f"Job {job.name} is suspended until {until}.")}
    if started:
        reason = "Preempted" if obs.queued else "Suspended"
        why = "its queue preempted it" if obs.queued else "someone set spec.suspend"
        targets[ConditionType.RUNNING] = (F, reason, f"Job {job.name} was suspended again ({why}); its pods are "
                                                     "stopped and it resumes when it is admitted again.")
    return targets


def _job_targets(obs: Observation, result: ConversionResult | None,
                 reached: frozenset[ConditionType]) -> dict[ConditionType, Target]:
    """Conditions implied by the Job (Accepted is decided elsewhere); `reached`: the stages this generation
    has reached before."""
    job, pod = obs.job, obs.pod
    if job is None:
        if not obs.job_deleted:
            return {}
        message = "The Job was deleted before it finished; change the spec to run the conversion again."
        return {ConditionType.RUNNING: (F, "JobDeleted", message),
                ConditionType.SUCCEEDED: (F, "JobDeleted", message),
                ConditionType.FAILED: (T, "JobDeleted", message)}
    finished = job.failure is not None or job.complete
    if job.suspended and not finished:
        return _suspended(job, obs, ConditionType.RUNNING in reached)
    targets: dict[ConditionType, Target] = {}
    if obs.queued or ConditionType.QUEUED in reached:
        targets[ConditionType.QUEUED] = (F, "Admitted", f"Job {job.name} was admitted and is not suspended.")
    if job.failure is not None:
        reason, message = _failure(job, pod, result)
        targets[ConditionType.RUNNING] = (F, "JobFinished", f"Job {job.name} failed.")
        if result is not None and result.exit_code == ExitCode.VERIFICATION:
            targets[ConditionType.VERIFIED] = (F, reason, message)
        targets[ConditionType.SUCCEEDED] = (F, reason, message)
        targets[ConditionType.FAILED] = (T, reason, message)
    elif job.complete:
        targets[ConditionType.RUNNING] = (F, "JobFinished", f"Job {job.name} completed.")
        targets[ConditionType.VERIFIED] = _verified(obs.verify, result)
        targets[ConditionType.SUCCEEDED] = _succeeded(job, result)
    else:
        targets[ConditionType.RUNNING] = _running(job, pod)
    return targets


def summarize(stages: dict[ConditionType, Condition]) -> tuple[Phase, Target, Target | None, Target | None]:
    """Phase, Ready, Reconciling and Stalled from the stage conditions (Accepted must be among them). The summary
    conditions take the reason and message of the stage that decides the phase."""
    accepted = stages[ConditionType.ACCEPTED]

    def true(kind: ConditionType) -> bool:
        cond = stages.get(kind)
        return cond is not None and cond.status == T

    running = stages.get(ConditionType.RUNNING)
    if accepted.status != T:
        phase = Phase.WAITING if accepted.reason in RECHECK_REASONS else Phase.REJECTED
        source = accepted
    elif true(ConditionType.FAILED):
        phase, source = Phase.FAILED, stages[ConditionType.FAILED]
    elif true(ConditionType.SUCCEEDED):
        phase, source = Phase.SUCCEEDED, stages[ConditionType.SUCCEEDED]
    elif true(ConditionType.QUEUED):
        phase, source = Phase.QUEUED, running or stages[ConditionType.QUEUED]
    elif running is not None and running.status == T:
        phase, source = Phase.RUNNING, running
    else:
        phase, source = Phase.PENDING, running or accepted
    said = (source.reason, source.message)
    ready = (T if phase == Phase.SUCCEEDED else F, *said)
    reconciling = (T, *said) if phase in (Phase.WAITING, Phase.QUEUED, Phase.PENDING, Phase.RUNNING) else None
    stalled = (T, *said) if phase in (Phase.REJECTED, Phase.FAILED) else None
    return phase, ready, reconciling, stalled


def is_terminal(status: CheckpointConversionStatus | None, generation: int) -> bool:
    """Succeeded or Failed is True for this generation: nothing is left to run."""
    if status is None:
        return False
    return any(c.type in (ConditionType.SUCCEEDED, ConditionType.FAILED) and c.status == T
               and c.observed_generation == generation for c in status.conditions)


def is_accepted(status: CheckpointConversionStatus | None, generation: int) -> bool:
    cond = None if status is None else status.condition(ConditionType.ACCEPTED)
    return cond is not None and cond.status == T and cond.observed_generation == generation


def awaits_recheck(status: CheckpointConversionStatus | None, generation: int) -> bool:
    """Rejected for a reason that may clear up by itself (a missing PVC, a destination in use)."""
    cond = None if status is None else status.condition(ConditionType.ACCEPTED)
    return (cond is not None and cond.status == F and cond.reason in RECHECK_REASONS
            and cond.observed_generation == generation)


class _Conditions:
    """Builds the new list, keeping lastTransitionTime when a condition's status does not change."""

    def __init__(self, previous: Sequence[Condition], generation: int, now: datetime) -> None:
        self._previous = {c.type: c for c in previous}
        self._generation, self._now = generation, now
        self.items: dict[ConditionType, Condition] = {
            c.type: c for c in previous if c.observed_generation == generation}

    def set(self, kind: ConditionType, target: Target) -> None:
        status, reason, message = target
        old = self._previous.get(kind)
        since = old.last_transition_time if old is not None and old.status == status else self._now
        self.items[kind] = Condition(type=kind, status=status, reason=reason_or(reason, "Unknown"),
                                     message=_clip(message), last_transition_time=since,
                                     observed_generation=self._generation)

    def ordered(self, only_accepted: bool) -> tuple[Phase | None, list[Condition]]:
        """The phase and the conditions: the summary first, then the stages in their order."""
        kinds = STAGES[:1] if only_accepted else STAGES
        stages = {k: self.items[k] for k in kinds if k in self.items}
        if ConditionType.ACCEPTED not in stages:
            return None, list(stages.values())
        phase, ready, reconciling, stalled = summarize(stages)
        summary: list[Condition] = []
        for kind, target in ((ConditionType.READY, ready), (ConditionType.RECONCILING, reconciling),
                             (ConditionType.STALLED, stalled)):
            if target is not None:
                self.set(kind, target)
                summary.append(self.items[kind])
        return phase, summary + list(stages.values())


def _result_status(result: ConversionResult) -> ConversionResultStatus:
    return ConversionResultStatus.model_validate(result.model_dump(exclude={"message"}))


def derive_status(previous: CheckpointConversionStatus | None, *, generation: int, now: datetime,
                  acceptance: Acceptance | None = None,
                  observation: Observation | None = None) -> CheckpointConversionStatus:
    """The new status. `acceptance=None` keeps the Accepted condition; `observation=None` keeps the rest."""
    prev = previous or CheckpointConversionStatus()
    now = now.astimezone(UTC).replace(microsecond=0)
    same = prev.observed_generation == generation
    conds = _Conditions(prev.conditions, generation, now)
    if acceptance is not None:
        verdict = T if acceptance.accepted else F
        conds.set(ConditionType.ACCEPTED, (verdict, acceptance.reason, acceptance.message))
    accepted = conds.items.get(ConditionType.ACCEPTED)
    if accepted is None and acceptance is None:
        return prev  # this generation was not reconciled yet: nothing to derive
    if accepted is None or accepted.status != T:
        phase, conditions = conds.ordered(True)
        return CheckpointConversionStatus(observed_generation=generation, phase=phase, conditions=conditions)
    kept = prev if same else CheckpointConversionStatus()
    obs = observation
    pod = obs.pod if obs is not None else None
    result = parse_result(pod.termination_message if pod is not None else None)
    progress = str(obs.progress) if obs and obs.progress else kept.progress
    sticky = is_terminal(prev, generation) and result is None  # only a (late) result refines an outcome
    if obs is not None and not sticky:
        for kind, target in _job_targets(obs, result, frozenset(conds.items)).items():
            conds.set(kind, target)
    job = obs.job if obs is not None else None
    phase, conditions = conds.ordered(False)
    return CheckpointConversionStatus(
        observed_generation=generation,
        phase=phase,
        conditions=conditions,
        job_name=job.name if job is not None else kept.job_name,
        start_time=(job.start_time if job is not None else None) or kept.start_time,
        completion_time=(job.completion_time if job is not None else None) or kept.completion_time,
        progress=progress,
        result=_result_status(result) if result is not None else kept.result,
    )


def terminal_transition(previous: CheckpointConversionStatus | None, new: CheckpointConversionStatus,
                        generation: int) -> ConditionType | None:
    """SUCCEEDED or FAILED when `new` reached that outcome for this generation and `previous` had not."""
    if is_terminal(previous, generation) or not is_terminal(new, generation):
        return None
    failed = new.condition(ConditionType.FAILED)
    return ConditionType.FAILED if failed is not None and failed.status == T else ConditionType.SUCCEEDED


def acceptance_changed(previous: CheckpointConversionStatus | None,
                       new: CheckpointConversionStatus) -> Condition | None:
    """The new Accepted condition when its status or reason changed (one Event per change, not per retry)."""
    before = None if previous is None else previous.condition(ConditionType.ACCEPTED)
    after = new.condition(ConditionType.ACCEPTED)
    if after is None:
        return None
    if before is not None and (before.status, before.reason, before.observed_generation) == (
            after.status, after.reason, after.observed_generation):
        return None
    return after
