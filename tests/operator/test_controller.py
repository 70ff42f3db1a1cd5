"""Controller logic against an in-memory stand-in for the API (fast; no kopf, no HTTP)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from ms2mg_converter.result import ConversionResult
from ms2mg_operator.api.v1alpha1 import CheckpointConversionStatus, ConditionType, ObjectMeta, Phase
from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.controller import Context, poll, reconcile, sync
from ms2mg_operator.jobs import CONTAINER_NAME, job_name
from ms2mg_operator.keys import Keys
from ms2mg_operator.kube import JobOwnershipError, KubeClient, PermanentApiError, TransientApiError
from ms2mg_operator.metrics import Metrics
from ms2mg_operator.observe import JobInfo, PodInfo, job_info, pod_info
from ms2mg_operator.poller import Task
from tests.operator.conftest import NAMESPACE, UID, make_body
from tests.operator.test_api import spec_with

Obj = dict[str, Any]
NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
SUMMARY = {"Ready", "Reconciling", "Stalled"}


class FakeKube(KubeClient):
    """The KubeClient operations on dicts; `fail` maps an operation name to an exception to raise once."""

    def __init__(self) -> None:  # no ApiClient
        self.conversions: dict[str, Obj] = {}
        self.jobs: dict[str, Obj] = {}
        self.pods: dict[str, Obj] = {}
        self.pvcs = {"mindformers", "megatron"}
        self.logs: dict[str, str] = {}
        self.events: list[tuple[str, str, str]] = []
        self.deleted: list[str] = []
        self.fail: dict[str, Exception] = {}

    def _maybe_fail(self, op: str) -> None:
        if op in self.fail:
            raise self.fail.pop(op)

    def get_conversion(self, namespace: str, name: str) -> Obj | None:
        self._maybe_fail("get_conversion")
        return copy.deepcopy(self.conversions.get(name))

    def list_conversions(self, namespace: str) -> list[Obj]:
        return copy.deepcopy(list(self.conversions.values()))

    def patch_conversion_status(self, namespace: str, name: str, status: Obj) -> bool:
        self._maybe_fail("patch_status")
        if name not in self.conversions:
            return False
        self.conversions[name]["status"] = {k: v for k, v in status.items() if v is not None}
        return True

    def get_job(self, namespace: str, name: str) -> Obj | None:
        return copy.deepcopy(self.jobs.get(name))

    def list_jobs(self, namespace: str, label: str, value: str) -> list[Obj]:
        return [copy.deepcopy(j) for j in self.jobs.values() if j["metadata"]["labels"].get(label) == value]

    def create_or_adopt_job(self, job: Obj, owner_uid: str) -> tuple[Obj, bool]:
        self._maybe_fail("create_job")
        name = job["metadata"]["name"]
        if name in self.jobs:
            owners = self.jobs[name]["metadata"].get("ownerReferences", [])
            if any(o["uid"] == owner_uid for o in owners):
                return copy.deepcopy(self.jobs[name]), True
            raise JobOwnershipError(f"Job {name} is not ours", 409)
        self.jobs[name] = copy.deepcopy(job)
        return copy.deepcopy(job), False

    def delete_job(self, namespace: str, name: str) -> None:
        """Foreground: the Job stays, marked for deletion, until the test plays the garbage collector (`gc`)."""
        self.deleted.append(name)
        if name in self.jobs:
            self.jobs[name]["metadata"]["deletionTimestamp"] = "2026-11-27T12:00:00Z"

    def gc(self) -> None:
        """The garbage collector finishes the foreground deletions: Jobs marked for deletion are gone."""
        for name in [n for n, j in self.jobs.items() if j["metadata"].get("deletionTimestamp")]:
            del self.jobs[name]

    def list_pods(self, namespace: str, label: str, value: str) -> list[Obj]:
        return [copy.deepcopy(p) for p in self.pods.values() if p["metadata"]["labels"].get(label) == value]

    def pvc_exists(self, namespace: str, name: str) -> bool:
        return name in self.pvcs

    def read_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str | None:
        return self.logs.get(pod)

    def emit_event(self, involved: Mapping[str, object], event_type: str, reason: str, message: str) -> None:
        self.events.append((str(involved["name"]), event_type, reason))


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def ctx(kube: FakeKube, settings: OperatorSettings) -> Context:
    return Context(kube=kube, settings=settings, metrics=Metrics(), clock=lambda: NOW)


def add(kube: FakeKube, body: Obj) -> Obj:
    kube.conversions[body["metadata"]["name"]] = body
    return body


def status_of(kube: FakeKube, name: str = "llama") -> CheckpointConversionStatus:
    return CheckpointConversionStatus.model_validate(kube.conversions[name].get("status", {}))


def conditions(kube: FakeKube, name: str = "llama") -> list[tuple[str, str, str]]:
    """The stage conditions (the summary ones are checked through `phase`/`ready`)."""
    return [(c.type.value, c.status.value, c.reason) for c in status_of(kube, name).conditions
            if c.type.value not in SUMMARY]


def phase(kube: FakeKube, name: str = "llama") -> Phase | None:
    return status_of(kube, name).phase


def ready(kube: FakeKube, name: str = "llama") -> tuple[str, str]:
    cond = status_of(kube, name).condition(ConditionType.READY)
    assert cond is not None
    return cond.status.value, cond.reason


def jobs_of(*jobs: Obj) -> list[JobInfo]:
    return [job_info(j) for j in jobs]


def pods_of(*pods: Obj) -> list[PodInfo]:
    return [pod_info(p, CONTAINER_NAME, Keys()) for p in pods]


def expected_job(body: Obj) -> str:
    return job_name(ObjectMeta.model_validate(body["metadata"]))


def metric(ctx: Context, name: str, labels: dict[str, str] | None = None) -> float:
    value = ctx.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


def test_creates_the_job(ctx: Context, kube: FakeKube) -> None:
    body = add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    assert list(kube.jobs) == [expected_job(body)]
    assert conditions(kube) == [("Accepted", "True", "JobCreated"), ("Running", "False", "Pending")]
    assert phase(kube) == Phase.PENDING and ready(kube) == ("False", "Pending")
    assert status_of(kube).job_name == expected_job(body)
    assert kube.events == [("llama", "Normal", "JobCreated")]
    assert metric(ctx, "ms2mg_jobs_created_total") == 1
    reconcile(ctx, NAMESPACE, "llama")  # idempotent: the recorded Job is followed, not created again
    assert len(kube.jobs) == 1 and len(kube.events) == 1


@pytest.mark.parametrize(("spec", "reason", "text"), [
    (spec_with(**{"source.path": "/etc"}), "InvalidSpec", "spec.source.path"),
    (spec_with(model={"numAttentionHeads": 30, "numLayers": 3}), "ParallelismMismatch", "not divisible"),
    (spec_with(image="docker.io/evil:1"), "ImageNotAllowed", "registry.example/*"),
    (spec_with(image="registry.example.evil/x:1"), "ImageNotAllowed", "is not allowed"),
    (spec_with(serviceAccountName="cluster-admin-sa"), "ServiceAccountNotAllowed", "allowed: ms2mg-converter"),
    (spec_with(**{"source.pvc": "nope"}), "SourcePVCNotFound", "ml/nope"),
    (spec_with(**{"destination.pvc": "nope"}), "DestinationPVCNotFound", "ml/nope"),
])
def test_rejections(ctx: Context, kube: FakeKube, spec: Obj, reason: str, text: str) -> None:
    ctx.settings = ctx.settings.model_copy(update={"allowed_images": ["registry.example/*"]})
    add(kube, make_body(spec))
    reconcile(ctx, NAMESPACE, "llama")
    assert not kube.jobs
    assert conditions(kube) == [("Accepted", "False", reason)]
    waits = reason.endswith("PVCNotFound")
    assert phase(kube) == (Phase.WAITING if waits else Phase.REJECTED) and ready(kube) == ("False", reason)
    stalled = status_of(kube).condition(ConditionType.STALLED)
    assert (stalled is None) == waits
    assert ((NAMESPACE, "llama") in ctx.poller.scheduled()) == waits
    accepted = status_of(kube).condition(ConditionType.ACCEPTED)
    assert accepted is not None and text in accepted.message
    assert kube.events == [("llama", "Warning", reason)]
    reconcile(ctx, NAMESPACE, "llama")  # no new Event, no status churn
    assert len(kube.events) == 1


def test_missing_pvc_clears_up(ctx: Context, kube: FakeKube) -> None:
    kube.pvcs.discard("megatron")
    add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    assert conditions(kube) == [("Accepted", "False", "DestinationPVCNotFound")]
    kube.pvcs.add("megatron")
    reconcile(ctx, NAMESPACE, "llama")
    assert conditions(kube)[0] == ("Accepted", "True", "JobCreated")
    assert len(kube.jobs) == 1


def test_destination_conflict_until_the_first_is_gone(ctx: Context, kube: FakeKube) -> None:
    add(kube, make_body(name="first", uid="uid-1", created="2026-11-27T09:00:00Z"))
    add(kube, make_body(spec_with(**{"destination.path": "llama2-7b"}), name="second", uid="uid-2"))
    add(kube, make_body(spec_with(**{"destination.path": "elsewhere"}), name="third", uid="uid-3"))
    for name in ("second", "first", "third"):
        reconcile(ctx, NAMESPACE, name)
    assert conditions(kube, "second") == [("Accepted", "False", "DestinationConflict")]
    assert conditions(kube, "first")[0] == ("Accepted", "True", "JobCreated")
    assert conditions(kube, "third")[0] == ("Accepted", "True", "JobCreated")
    del kube.conversions["first"]
    reconcile(ctx, NAMESPACE, "second")
    assert conditions(kube, "second")[0] == ("Accepted", "True", "JobCreated")


def test_invalid_neighbour_claims_nothing(ctx: Context, kube: FakeKube) -> None:
    add(kube, make_body(spec_with(**{"source.path": "/abs"}), name="broken", uid="uid-0",
                        created="2026-11-27T08:00:00Z"))
    add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    assert conditions(kube)[0] == ("Accepted", "True", "JobCreated")


def test_adopts_its_own_job(ctx: Context, kube: FakeKube, settings: OperatorSettings) -> None:
    body = add(kube, make_body())
    name = expected_job(body)
    kube.jobs[name] = {"metadata": {"name": name, "labels": {}, "ownerReferences": [{"uid": UID}]},
                       "status": {"active": 1}}
    reconcile(ctx, NAMESPACE, "llama")
    assert conditions(kube)[0] == ("Accepted", "True", "JobAdopted")
    assert len(kube.jobs) == 1


def test_foreign_job_with_our_name(ctx: Context, kube: FakeKube) -> None:
    body = add(kube, make_body())
    name = expected_job(body)
    kube.jobs[name] = {"metadata": {"name": name, "labels": {}, "ownerReferences": [{"uid": "other"}]}}
    reconcile(ctx, NAMESPACE, "llama")
    assert conditions(kube) == [("Accepted", "False", "JobNameConflict")]


def test_job_refused_by_the_server(ctx: Context, kube: FakeKube) -> None:
    add(kube, make_body())
    kube.fail["create_job"] = PermanentApiError("POST jobs: admission webhook denied", 422)
    reconcile(ctx, NAMESPACE, "llama")
    assert conditions(kube) == [("Accepted", "False", "JobRejected")]


def test_transient_errors_propagate(ctx: Context, kube: FakeKube) -> None:
    add(kube, make_body())
    kube.fail["create_job"] = TransientApiError("POST jobs: 500", 500, delay=1)
    with pytest.raises(TransientApiError):
        reconcile(ctx, NAMESPACE, "llama")
    assert "status" not in kube.conversions["llama"]
    reconcile(ctx, NAMESPACE, "llama")
    assert conditions(kube)[0] == ("Accepted", "True", "JobCreated")


def test_new_generation_replaces_the_job(ctx: Context, kube: FakeKube) -> None:
    """A new generation deletes the old Job in the foreground and starts its own only once the old one is gone
    (and, for a Job already gone, once no pod of it runs)."""
    add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    old = next(iter(kube.jobs))
    gen2 = make_body(spec_with(**{"parallelism.tensor": 4}), generation=2,
                     status=kube.conversions["llama"]["status"])
    add(kube, gen2)
    reconcile(ctx, NAMESPACE, "llama")
    assert kube.deleted == [old] and list(kube.jobs) == [old]  # deleting, not gone: no new Job yet
    assert conditions(kube) == [("Accepted", "False", "WaitingForPreviousJob")]
    assert phase(kube) == Phase.WAITING and f"Job {old}" in status_of(kube).conditions[0].message
    reconcile(ctx, NAMESPACE, "llama")  # still waiting; not deleted twice
    assert kube.deleted == [old] and list(kube.jobs) == [old]
    kube.gc()  # the old Job's pods are gone, then the Job: its DELETED event brings a sync
    kube.pods["old-pod"] = running_pod("old-pod")  # ... but an orphaned pod of generation 1 still runs
    sync(ctx, NAMESPACE, "llama", UID, [], [], deleted_job=old)
    assert conditions(kube) == [("Accepted", "False", "WaitingForPreviousJob")]
    assert "pod old-pod" in status_of(kube).conditions[0].message and not kube.jobs
    kube.pods["old-pod"]["status"]["phase"] = "Failed"  # it stopped
    sync(ctx, NAMESPACE, "llama", UID, [], pods_of(kube.pods["old-pod"]))
    assert list(kube.jobs) == [expected_job(gen2)]
    status = status_of(kube)
    assert status.observed_generation == 2 and status.job_name == expected_job(gen2)
    assert conditions(kube) == [("Accepted", "True", "JobCreated"), ("Running", "False", "Pending")]
    assert "--target-tensor-parallel-size" in kube.jobs[expected_job(gen2)]["spec"]["template"]["spec"][
        "containers"][0]["args"]


def test_waiting_for_the_previous_job_is_rechecked_by_the_poller(ctx: Context, kube: FakeKube) -> None:
    add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    add(kube, make_body(spec_with(**{"parallelism.tensor": 4}), generation=2,
                        status=kube.conversions["llama"]["status"]))
    reconcile(ctx, NAMESPACE, "llama")
    entry = ctx.poller.scheduled()[(NAMESPACE, "llama")]
    assert entry.task == Task.RECHECK
    kube.gc()
    poll(ctx, (NAMESPACE, "llama"), entry)  # a lost DELETED event: the re-check starts generation 2
    assert conditions(kube)[0] == ("Accepted", "True", "JobCreated") and len(kube.jobs) == 1
    assert (NAMESPACE, "llama") not in ctx.poller.scheduled()


def test_finished_generation_is_never_rerun(ctx: Context, kube: FakeKube) -> None:
    body = add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    job = kube.jobs[expected_job(body)]
    job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    sync(ctx, NAMESPACE, "llama", UID, jobs_of(job), [])
    assert status_of(kube).condition(ConditionType.SUCCEEDED) is not None
    assert phase(kube) == Phase.SUCCEEDED and ready(kube) == ("True", "JobComplete")
    kube.jobs.clear()  # ttlSecondsAfterFinished removed it
    reconcile(ctx, NAMESPACE, "llama")  # e.g. on.resume after an operator restart
    assert not kube.jobs


def test_recorded_job_gone_before_finishing(ctx: Context, kube: FakeKube) -> None:
    add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    kube.jobs.clear()
    reconcile(ctx, NAMESPACE, "llama")
    assert conditions(kube)[-1] == ("Failed", "True", "JobDeleted")
    assert phase(kube) == Phase.FAILED
    assert not kube.jobs


def running_pod(name: str, phase: str = "Running", message: str | None = None, code: int = 0) -> Obj:
    state: Obj = {"running": {}} if message is None else {"terminated": {"exitCode": code, "message": message}}
    return {"metadata": {"name": name, "labels": {"ms2mg.io/generation": "1", "ms2mg.io/conversion-uid": UID},
                         "creationTimestamp": "2026-11-27T11:00:00Z"},
            "status": {"phase": phase, "containerStatuses": [{"name": "convert", "state": state}]}}


def test_sync_follows_the_job_to_success(ctx: Context, kube: FakeKube) -> None:
    body = add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    job = kube.jobs[expected_job(body)]
    job["status"] = {"active": 1, "startTime": "2026-11-27T11:00:00Z"}
    kube.logs["p1"] = '{"done": 37, "total": 112, "bytes": 5}\nms2mg: wrote a file\n'
    sync(ctx, NAMESPACE, "llama", UID, jobs_of(job), pods_of(running_pod("p1")))
    assert conditions(kube)[-1] == ("Running", "True", "Converting")
    assert phase(kube) == Phase.RUNNING and ready(kube) == ("False", "Converting")
    assert status_of(kube).progress == "37/112"
    entry = ctx.poller.scheduled()[(NAMESPACE, "llama")]
    assert (entry.task, entry.pod) == (Task.PROGRESS, "p1")  # progress reads while the pod runs
    kube.logs["p1"] += '{"done": 40, "total": 112, "bytes": 6, "phase": "write", "eta": 3.5}\n'  # newer fields
    poll(ctx, (NAMESPACE, "llama"), entry)
    assert status_of(kube).progress == "40/112"
    result = ConversionResult(status="Succeeded", reason="Converted", files=4, bytes=4096, seconds=30.0,
                              verified=True)
    job["status"] = {"succeeded": 1, "startTime": "2026-11-27T11:00:00Z",
                     "completionTime": "2026-11-27T11:00:30Z",
                     "conditions": [{"type": "Complete", "status": "True"}]}
    pod = running_pod("p1", "Succeeded", result.to_json())
    sync(ctx, NAMESPACE, "llama", UID, jobs_of(job), pods_of(pod))
    assert conditions(kube)[-2:] == [("Verified", "True", "Verified"), ("Succeeded", "True", "Converted")]
    assert phase(kube) == Phase.SUCCEEDED and ready(kube) == ("True", "Converted")
    assert (NAMESPACE, "llama") not in ctx.poller.scheduled()  # nothing polled once finished
    assert ("llama", "Normal", "Converted") in kube.events
    assert metric(ctx, "ms2mg_conversions_total", {"result": "succeeded", "reason": "Converted"}) == 1
    assert metric(ctx, "ms2mg_converted_bytes_total") == 4096
    assert metric(ctx, "ms2mg_conversion_duration_seconds_sum", {"result": "succeeded"}) == 30.0
    sync(ctx, NAMESPACE, "llama", UID, jobs_of(job), pods_of(pod))  # counted once
    assert metric(ctx, "ms2mg_conversions_total", {"result": "succeeded", "reason": "Converted"}) == 1


def test_defaulted_model_facts_raise_a_warning_event(ctx: Context, kube: FakeKube) -> None:
    body = add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    job = kube.jobs[expected_job(body)]
    job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    result = ConversionResult(status="Succeeded", reason="Converted", verified=True, defaulted=["rotary_base"])
    pod = running_pod("p1", "Succeeded", result.to_json())
    sync(ctx, NAMESPACE, "llama", UID, jobs_of(job), pods_of(pod))
    assert ("llama", "Normal", "Converted") in kube.events
    assert ("llama", "Warning", "ModelFactsDefaulted") in kube.events
    assert phase(kube) == Phase.SUCCEEDED
    assert status_of(kube).result is not None and status_of(kube).result.defaulted == ["rotary_base"]  # type: ignore[union-attr]


def test_sync_records_the_final_progress(ctx: Context, kube: FakeKube) -> None:
    """Found by the integration tests: the poller may last have seen "5/12"; the log of the finished pod is read
    once more, so a Succeeded conversion does not show a stale PROGRESS."""
    body = add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    job = kube.jobs[expected_job(body)]
    job["status"] = {"active": 1}
    kube.logs["p1"] = '{"done": 5, "total": 12, "bytes": 5}\n'
    sync(ctx, NAMESPACE, "llama", UID, jobs_of(job), pods_of(running_pod("p1")))
    assert status_of(kube).progress == "5/12"
    kube.logs["p1"] += '{"done": 12, "total": 12, "bytes": 9}\nms2mg: wrote 4 file(s)\n'
    job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    result = ConversionResult(status="Succeeded", reason="Converted", verified=True)
    pod = running_pod("p1", "Succeeded", result.to_json())
    sync(ctx, NAMESPACE, "llama", UID, jobs_of(job), pods_of(pod))
    assert status_of(kube).progress == "12/12"
    kube.logs["p1"] = '{"done": 1, "total": 12, "bytes": 1}\n'  # terminal: the log is not read again
    sync(ctx, NAMESPACE, "llama", UID, jobs_of(job), pods_of(pod))
    assert status_of(kube).progress == "12/12"


def test_sync_reports_failure(ctx: Context, kube: FakeKube) -> None:
    body = add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    job = kube.jobs[expected_job(body)]
    job["status"] = {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                                  "reason": "PodFailurePolicy", "message": "exit 3"}]}
    result = ConversionResult(status="Failed", reason="InvalidSource", exit_code=3, message="bad header")
    sync(ctx, NAMESPACE, "llama", UID, jobs_of(job), pods_of(running_pod("p1", "Failed", result.to_json(), 3)))
    failed = status_of(kube).condition(ConditionType.FAILED)
    assert failed is not None and failed.reason == "InvalidSource" and failed.message == "bad header"
    stalled = status_of(kube).condition(ConditionType.STALLED)
    assert phase(kube) == Phase.FAILED and stalled is not None and stalled.reason == "InvalidSource"
    assert ("llama", "Warning", "InvalidSource") in kube.events
    assert metric(ctx, "ms2mg_conversions_total", {"result": "failed", "reason": "InvalidSource"}) == 1


def test_sync_ignores_what_is_not_its_business(ctx: Context, kube: FakeKube) -> None:
    add(kube, make_body(spec_with(**{"source.pvc": "nope"})))
    reconcile(ctx, NAMESPACE, "llama")
    before = copy.deepcopy(kube.conversions["llama"])
    sync(ctx, NAMESPACE, "llama", UID, [], [])  # not accepted: nothing to follow
    sync(ctx, NAMESPACE, "llama", "another-uid", [], [])  # a re-created namesake
    sync(ctx, NAMESPACE, "gone", UID, [], [])
    assert kube.conversions["llama"] == before


def test_deleted_job_event_marks_failure(ctx: Context, kube: FakeKube) -> None:
    body = add(kube, make_body())
    reconcile(ctx, NAMESPACE, "llama")
    sync(ctx, NAMESPACE, "llama", UID, [], [], deleted_job=expected_job(body))
    assert conditions(kube)[-1] == ("Failed", "True", "JobDeleted")


def test_cleanup_stops_the_poller_and_closes_the_api_client(kube: FakeKube, settings: OperatorSettings) -> None:
    import kopf

    from ms2mg_operator.handlers import CONTEXT_KEY, on_cleanup

    closed: list[bool] = []
    kube.close = lambda: closed.append(True)  # type: ignore[method-assign]
    ctx = Context(kube=kube, settings=settings, metrics=Metrics())
    ctx.poller.start(lambda key, entry: None)
    on_cleanup(memo=kopf.Memo({CONTEXT_KEY: ctx}))
    assert closed == [True]
    assert ctx.poller._thread is None
