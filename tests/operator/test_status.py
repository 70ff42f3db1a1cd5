"""Status derivation: a table of observed states and the conditions they must produce."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from ms2mg_converter.result import ConversionResult
from ms2mg_operator.api.v1alpha1 import CheckpointConversionStatus, ConditionType, Phase
from ms2mg_operator.observe import JobInfo, Observation, PodInfo, Progress
from ms2mg_operator.status import (
    Acceptance,
    acceptance_changed,
    awaits_recheck,
    derive_status,
    is_terminal,
    terminal_transition,
)

T0 = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
CREATED = Acceptance(True, "JobCreated", "Job llama-g1-x created for generation 1.")
OK = ConversionResult(status="Succeeded", reason="Converted", message="converted 112 tensor groups",
                      files=5, bytes=1000, seconds=42.0, padded_vocab_size=32256, verified=True,
                      manifest_path="/mnt/destination/out/ms2mg-manifest.json", converter_version="0.1.0")
BAD_SOURCE = ConversionResult(status="Failed", reason="InvalidSource", exit_code=3,
                              message="model-00001.safetensors: header is truncated")
BAD_VERIFY = ConversionResult(status="Failed", reason="VerificationFailed", exit_code=5,
                              message="mp_rank_01: decoder.layers.0.mlp.linear_fc1.weight differs")


def job(**kw: object) -> JobInfo:
    base: dict[str, object] = {"name": "llama-g1-x", "suspended": False, "complete": False, "failure": None,
                               "start_time": T0, "completion_time": None}
    base.update(kw)
    return JobInfo(**base)  # type: ignore[arg-type]


def pod(phase: str, **kw: object) -> PodInfo:
    return PodInfo(name="llama-g1-x-abcde", phase=phase, **kw)  # type: ignore[arg-type]


def terminated(result: ConversionResult | str, code: int, reason: str = "Error") -> PodInfo:
    message = result if isinstance(result, str) else result.to_json()
    return pod("Succeeded" if code == 0 else "Failed", exit_code=code, terminated_reason=reason,
               termination_message=message)


@dataclass
class Case:
    id: str
    observation: Observation | None
    expected: list[tuple[str, str, str]]
    acceptance: Acceptance | None = CREATED
    previous: CheckpointConversionStatus | None = None
    checks: dict[str, object] = field(default_factory=dict)


def accepted(*rest: tuple[str, str, str]) -> list[tuple[str, str, str]]:
    return [("Accepted", "True", "JobCreated"), *rest]


CASES = [
    Case("invalid-spec", None, [("Accepted", "False", "InvalidSpec")],
         acceptance=Acceptance(False, "InvalidSpec", "spec.source.path: must be relative")),
    Case("job-created-no-pod", Observation(job=job()), accepted(("Running", "False", "Pending")),
         checks={"job_name": "llama-g1-x", "start_time": T0}),
    Case("nothing-known-yet", Observation(job=None), accepted()),
    Case("queued", Observation(job=job(suspended=True), queued=True),
         accepted(("Queued", "True", "WaitingForAdmission"))),
    Case("admitted-running", Observation(job=job(), pod=pod("Running"), queued=True,
                                         progress=Progress(done=37, total=112)),
         accepted(("Queued", "False", "Admitted"), ("Running", "True", "Converting")),
         checks={"progress": "37/112"}),
    Case("image-pull", Observation(job=job(), pod=pod("Pending", waiting_reason="ImagePullBackOff",
                                                                waiting_message="Back-off pulling image")),
         accepted(("Running", "False", "ImagePullBackOff"))),
    Case("pod-pending", Observation(job=job(), pod=pod("Pending")),
         accepted(("Running", "False", "PodPending"))),
    Case("retrying", Observation(job=job(), pod=terminated("disk full", 6)),
         accepted(("Running", "False", "Retrying"))),
    Case("succeeded-verified",
         Observation(job=job(complete=True, completion_time=T1), pod=terminated(OK, 0, "Completed")),
         accepted(("Running", "False", "JobFinished"), ("Verified", "True", "Verified"),
                  ("Succeeded", "True", "Converted")),
         checks={"completion_time": T1, "result.bytes": 1000, "result.padded_vocab_size": 32256}),
    Case("succeeded-unverified",
         Observation(job=job(complete=True), pod=terminated(OK.model_copy(update={"verified": False}), 0),
                     verify=False),
         accepted(("Running", "False", "JobFinished"), ("Verified", "False", "VerificationSkipped"),
                  ("Succeeded", "True", "Converted"))),
    Case("succeeded-garbage-message", Observation(job=job(complete=True), pod=terminated("oops", 0)),
         accepted(("Running", "False", "JobFinished"), ("Verified", "Unknown", "ResultUnavailable"),
                  ("Succeeded", "True", "JobComplete")), checks={"result": None}),
    Case("failed-invalid-source",
         Observation(job=job(failure=("PodFailurePolicy", "matched rule")), pod=terminated(BAD_SOURCE, 3)),
         accepted(("Running", "False", "JobFinished"), ("Succeeded", "False", "InvalidSource"),
                  ("Failed", "True", "InvalidSource")),
         checks={"message:Failed": "header is truncated", "result.exit_code": 3}),
    Case("failed-verification",
         Observation(job=job(failure=("PodFailurePolicy", "")), pod=terminated(BAD_VERIFY, 5)),
         accepted(("Running", "False", "JobFinished"), ("Verified", "False", "VerificationFailed"),
                  ("Succeeded", "False", "VerificationFailed"), ("Failed", "True", "VerificationFailed"))),
    Case("failed-oom", Observation(job=job(failure=("BackoffLimitExceeded", "")),
                                   pod=pod("Failed", exit_code=137, terminated_reason="OOMKilled")),
         accepted(("Running", "False", "JobFinished"), ("Succeeded", "False", "OOMKilled"),
                  ("Failed", "True", "OOMKilled")), checks={"message:Failed": "memory limit"}),
    Case("failed-deadline", Observation(job=job(failure=("DeadlineExceeded", "Job was active longer"))),
         accepted(("Running", "False", "JobFinished"), ("Succeeded", "False", "DeadlineExceeded"),
                  ("Failed", "True", "DeadlineExceeded")), checks={"message:Failed": "active longer"}),
    Case("failed-crash-output", Observation(job=job(failure=("BackoffLimitExceeded", "")),
                                            pod=terminated("Traceback: KeyError 'x'", 1)),
         accepted(("Running", "False", "JobFinished"), ("Succeeded", "False", "BackoffLimitExceeded"),
                  ("Failed", "True", "BackoffLimitExceeded")), checks={"message:Failed": "KeyError"}),
    Case("failed-odd-reason", Observation(job=job(failure=("X", "")), pod=terminated(
        BAD_SOURCE.model_copy(update={"reason": "not a reason!"}), 3)),
         accepted(("Running", "False", "JobFinished"), ("Succeeded", "False", "ConversionFailed"),
                  ("Failed", "True", "ConversionFailed"))),
    Case("job-deleted-while-running", Observation(job=None, job_deleted=True),
         accepted(("Running", "False", "JobDeleted"), ("Succeeded", "False", "JobDeleted"),
                  ("Failed", "True", "JobDeleted"))),
]


PHASES: dict[str, tuple[Phase, str]] = {
    "invalid-spec": (Phase.REJECTED, "InvalidSpec"),
    "job-created-no-pod": (Phase.PENDING, "Pending"),
    "nothing-known-yet": (Phase.PENDING, "JobCreated"),
    "queued": (Phase.QUEUED, "WaitingForAdmission"),
    "admitted-running": (Phase.RUNNING, "Converting"),
    "image-pull": (Phase.PENDING, "ImagePullBackOff"),
    "pod-pending": (Phase.PENDING, "PodPending"),
    "retrying": (Phase.PENDING, "Retrying"),
    "succeeded-verified": (Phase.SUCCEEDED, "Converted"),
    "succeeded-unverified": (Phase.SUCCEEDED, "Converted"),
    "succeeded-garbage-message": (Phase.SUCCEEDED, "JobComplete"),
    "failed-invalid-source": (Phase.FAILED, "InvalidSource"),
    "failed-verification": (Phase.FAILED, "VerificationFailed"),
    "failed-oom": (Phase.FAILED, "OOMKilled"),
    "failed-deadline": (Phase.FAILED, "DeadlineExceeded"),
    "failed-crash-output": (Phase.FAILED, "BackoffLimitExceeded"),
    "failed-odd-reason": (Phase.FAILED, "ConversionFailed"),
    "job-deleted-while-running": (Phase.FAILED, "JobDeleted"),
}
"""Phase and Ready reason of each case."""
SUMMARY_TYPES = ("Ready", "Reconciling", "Stalled")


def summary(status: CheckpointConversionStatus) -> list[tuple[str, str, str]]:
    """The stage conditions (the summary conditions are checked by `check_summary`)."""
    return [(c.type.value, c.status.value, c.reason) for c in status.conditions if c.type.value not in SUMMARY_TYPES]


def check_summary(status: CheckpointConversionStatus, phase: Phase, reason: str) -> None:
    """Ready (True only when Succeeded), then Reconciling=True while work goes on or Stalled=True when only a spec
    change helps, all with the deciding stage's reason, in front of the stages."""
    head = [(c.type.value, c.status.value, c.reason) for c in status.conditions[:2]]
    ready = ("Ready", "True" if phase == Phase.SUCCEEDED else "False", reason)
    if phase == Phase.SUCCEEDED:
        assert head[0] == ready and head[1][0] not in SUMMARY_TYPES
    elif phase in (Phase.REJECTED, Phase.FAILED):
        assert head == [ready, ("Stalled", "True", reason)]
    else:
        assert head == [ready, ("Reconciling", "True", reason)]
    assert status.phase == phase


def lookup(status: CheckpointConversionStatus, dotted: str) -> object:
    if dotted.startswith("message:"):
        cond = status.condition(ConditionType(dotted.split(":", 1)[1]))
        return cond.message if cond is not None else None
    value: object = status
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_derive(case: Case) -> None:
    status = derive_status(case.previous, generation=1, now=T0, acceptance=case.acceptance,
                           observation=case.observation)
    assert summary(status) == case.expected
    check_summary(status, *PHASES[case.id])
    assert status.observed_generation == 1
    assert all(c.observed_generation == 1 and c.last_transition_time == T0 for c in status.conditions)
    for dotted, expected in case.checks.items():
        actual = lookup(status, dotted)
        if dotted.startswith("message:"):
            assert isinstance(actual, str) and str(expected) in actual
        else:
            assert actual == expected, dotted


def running_status() -> CheckpointConversionStatus:
    return derive_status(None, generation=1, now=T0, acceptance=CREATED,
                         observation=Observation(job=job(), pod=pod("Running"),
                                                 progress=Progress(done=1, total=4)))


def succeeded_status() -> CheckpointConversionStatus:
    return derive_status(running_status(), generation=1, now=T1, observation=Observation(
        job=job(complete=True), pod=terminated(OK, 0)))


def test_transition_time_kept_while_status_unchanged() -> None:
    first = running_status()
    later = derive_status(first, generation=1, now=T1, observation=Observation(
        job=job(), pod=pod("Running"), progress=Progress(done=3, total=4)))
    running = later.condition(ConditionType.RUNNING)
    assert running is not None and running.last_transition_time == T0
    assert later.progress == "3/4"
    done = succeeded_status()
    running = done.condition(ConditionType.RUNNING)
    assert running is not None and running.status.value == "False" and running.last_transition_time == T1
    accepted = done.condition(ConditionType.ACCEPTED)
    assert accepted is not None and accepted.last_transition_time == T0


def test_progress_kept_when_no_new_line() -> None:
    later = derive_status(running_status(), generation=1, now=T1, observation=Observation(
        job=job(), pod=pod("Running")))
    assert later.progress == "1/4"


def test_result_kept_after_pod_is_gone() -> None:
    again = derive_status(succeeded_status(), generation=1, now=T1 + timedelta(hours=1),
                          observation=Observation(job=job(complete=True)))
    assert again.result is not None and again.result.bytes == 1000
    assert again == succeeded_status()


def test_deleted_job_after_success_changes_nothing() -> None:
    done = succeeded_status()
    later = derive_status(done, generation=1, now=T1 + timedelta(days=1),
                          observation=Observation(job=None, job_deleted=True))
    assert later == done


def test_new_generation_starts_over() -> None:
    done = succeeded_status()
    gen2 = derive_status(done, generation=2, now=T1 + timedelta(hours=1),
                         acceptance=Acceptance(True, "JobCreated", "Job llama-g2-y created"),
                         observation=Observation(job=job(name="llama-g2-y")))
    assert summary(gen2) == [("Accepted", "True", "JobCreated"), ("Running", "False", "Pending")]
    accepted = gen2.condition(ConditionType.ACCEPTED)
    assert accepted is not None and accepted.last_transition_time == T0 and accepted.observed_generation == 2
    assert gen2.result is None and gen2.progress is None and gen2.job_name == "llama-g2-y"


def test_new_generation_rejected_drops_the_old_run() -> None:
    gen2 = derive_status(succeeded_status(), generation=2, now=T1,
                         acceptance=Acceptance(False, "DestinationConflict", "in use"))
    assert summary(gen2) == [("Accepted", "False", "DestinationConflict")]
    assert gen2.job_name is None and gen2.result is None
    assert awaits_recheck(gen2, 2) and not awaits_recheck(gen2, 3)


def test_sync_before_reconcile_of_a_new_generation_changes_nothing() -> None:
    done = succeeded_status()
    assert derive_status(done, generation=2, now=T1, observation=Observation(job=None)) is done


def test_message_is_clipped() -> None:
    huge = BAD_SOURCE.model_copy(update={"message": "x" * 10000})
    status = derive_status(None, generation=1, now=T0, acceptance=CREATED, observation=Observation(
        job=job(failure=("PodFailurePolicy", "")), pod=pod("Failed", exit_code=3,
                                                           termination_message=huge.model_dump_json())))
    failed = status.condition(ConditionType.FAILED)
    assert failed is not None and len(failed.message) <= 4096 and failed.message.endswith("[truncated]")


def test_transitions_and_terminal() -> None:
    running, done = running_status(), succeeded_status()
    assert not is_terminal(running, 1) and is_terminal(done, 1) and not is_terminal(done, 2)
    assert terminal_transition(running, done, 1) == ConditionType.SUCCEEDED
    assert terminal_transition(done, done, 1) is None
    failed = derive_status(running, generation=1, now=T1, observation=Observation(
        job=job(failure=("DeadlineExceeded", ""))))
    assert terminal_transition(running, failed, 1) == ConditionType.FAILED
    first = acceptance_changed(None, running)
    assert first is not None and first.reason == "JobCreated"
    assert acceptance_changed(running, done) is None


def test_every_case_has_its_phase() -> None:
    assert set(PHASES) == {c.id for c in CASES}


def stages(status: CheckpointConversionStatus) -> list[tuple[str, str, str]]:
    return summary(status)


def test_kueue_preemption_requeues() -> None:
    """Admitted, converting, then suspended again by Kueue (preemption): Running=False Preempted and Queued=True,
    not a stale Running=True Converting; admitted again: back to Pending/Running."""
    waiting = derive_status(None, generation=1, now=T0, acceptance=CREATED,
                            observation=Observation(job=job(suspended=True), queued=True))
    assert stages(waiting)[-1] == ("Queued", "True", "WaitingForAdmission")  # exactly: no Running stage yet
    converting = derive_status(waiting, generation=1, now=T0, observation=Observation(
        job=job(), pod=pod("Running"), queued=True, progress=Progress(done=5, total=12)))
    assert stages(converting)[1:] == [("Queued", "False", "Admitted"), ("Running", "True", "Converting")]
    preempted = derive_status(converting, generation=1, now=T1, observation=Observation(
        job=job(suspended=True), pod=pod("Running"), queued=True))
    assert stages(preempted) == [("Accepted", "True", "JobCreated"), ("Queued", "True", "WaitingForAdmission"),
                                 ("Running", "False", "Preempted")]
    check_summary(preempted, Phase.QUEUED, "Preempted")
    assert preempted.progress == "5/12"
    queued = preempted.condition(ConditionType.QUEUED)
    assert queued is not None and queued.last_transition_time == T1
    again = derive_status(preempted, generation=1, now=T1, observation=Observation(job=job(), queued=True))
    assert stages(again)[1:] == [("Queued", "False", "Admitted"), ("Running", "False", "Pending")]
    check_summary(again, Phase.PENDING, "Pending")


def test_suspended_by_hand_after_start() -> None:
    """Without a queue: a Job suspended after it started reads Suspended; cleared again, Queued goes False."""
    running = running_status()
    suspended = derive_status(running, generation=1, now=T1, observation=Observation(job=job(suspended=True)))
    assert stages(suspended)[1:] == [("Queued", "True", "WaitingForAdmission"), ("Running", "False", "Suspended")]
    assert "spec.suspend is cleared" in (suspended.condition(ConditionType.QUEUED) or CREATED).message
    resumed = derive_status(suspended, generation=1, now=T1, observation=Observation(job=job(), pod=pod("Running")))
    assert stages(resumed)[1:] == [("Queued", "False", "Admitted"), ("Running", "True", "Converting")]


def test_a_finished_job_is_never_queued() -> None:
    """Kubernetes may leave spec.suspend set on a Job that has finished: the outcome wins."""
    done = derive_status(running_status(), generation=1, now=T1, observation=Observation(
        job=job(suspended=True, complete=True), pod=terminated(OK, 0)))
    check_summary(done, Phase.SUCCEEDED, "Converted")


def test_waiting_phases() -> None:
    for reason in ("DestinationConflict", "SourcePVCNotFound", "DestinationPVCNotFound", "WaitingForPreviousJob"):
        status = derive_status(None, generation=1, now=T0, acceptance=Acceptance(False, reason, "wait"))
        check_summary(status, Phase.WAITING, reason)
        assert awaits_recheck(status, 1)
    for reason in ("ImageNotAllowed", "ServiceAccountNotAllowed", "ParallelismMismatch", "JobNameConflict"):
        status = derive_status(None, generation=1, now=T0, acceptance=Acceptance(False, reason, "no"))
        check_summary(status, Phase.REJECTED, reason)
        assert not awaits_recheck(status, 1)


def test_summary_follows_the_stages_and_keeps_its_transition_time() -> None:
    running = running_status()
    later = derive_status(running, generation=1, now=T1, observation=Observation(job=job(), pod=pod("Running")))
    reconciling = later.condition(ConditionType.RECONCILING)
    assert reconciling is not None and reconciling.last_transition_time == T0
    done = succeeded_status()
    assert done.condition(ConditionType.RECONCILING) is None and done.condition(ConditionType.STALLED) is None
    ready = done.condition(ConditionType.READY)
    assert ready is not None and ready.status.value == "True" and ready.last_transition_time == T1


def test_defaulted_model_facts_are_named_in_the_succeeded_message() -> None:
    facts = OK.model_copy(update={"defaulted": ["rotary_base", "norm_epsilon"]})
    done = derive_status(running_status(), generation=1, now=T1, observation=Observation(
        job=job(complete=True), pod=terminated(facts, 0)))
    succeeded = done.condition(ConditionType.SUCCEEDED)
    assert succeeded is not None and succeeded.status == "True"
    assert "rotary_base, norm_epsilon" in succeeded.message and "spec.config" in succeeded.message
    assert done.result is not None and done.result.defaulted == ["rotary_base", "norm_epsilon"]
    plain = succeeded_status().condition(ConditionType.SUCCEEDED)
    assert plain is not None and "defaults" not in plain.message
