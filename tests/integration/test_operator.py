"""The operator as a separate process against the real test control plane (issue 4, "a real API server").

What is real here: kube-apiserver 1.20 + etcd (storage, watches, RBAC, pods/binding, pods/log proxying to the node's
kubelet over mutual TLS), the 1.36 CRD server (the generated CRD: schema, CEL rules, defaults, printer columns,
status subresource), kube-controller-manager 1.20 (the Job controller creates the pods and sets Job conditions from
the pod phases; the garbage collector deletes Jobs and pods of deleted resources), ``kubectl`` (apply, wait, get),
the operator process (``python -m ms2mg_operator`` = ``ms2mg-operator``, with a ServiceAccount token bound to the
operator's RBAC only), and the converter: the fake kubelet (tests/k8s/kubelet.py) runs the pod's exact
``ms2mg convert ...`` arguments as rendered by the operator, with the volume mount paths mapped to directories.

What is simulated: scheduling and the container runtime (tests/k8s/kubelet.py); Job fields newer than 1.20
(``suspend``, ``podFailurePolicy``) are dropped by this API server, so those paths are covered by the rendering unit
tests (tests/operator/test_jobs.py) and the kmock tests (tests/operator/test_handlers.py). See
docs/operator-testing.md.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ms2mg_operator.api.v1alpha1 import CheckpointConversion
from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.jobs import render_job
from ms2mg_operator.keys import KUEUE_QUEUE_LABEL
from tests.integration.operator_env import (
    DEST_PVC,
    SAMPLE_GROUPS,
    SAMPLE_PATH,
    SOURCE_PVC,
    Env,
    condition,
    conversion,
    create_pvcs,
    events_for,
    has,
    megatron_files,
    operator_env,
    phase,
    ready,
    summary,
    tree,
)
from tests.k8s.cluster import Cluster, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]

UID_LABEL = "ms2mg.io/conversion-uid"


@pytest.fixture
def env(k8s_cluster: Cluster, ms2mg_crd: str, k8s_namespace: str, sample_volume: Path,
        tmp_path: Path) -> Iterator[Env]:
    with operator_env(k8s_cluster, k8s_namespace, sample_volume, tmp_path) as e:
        yield e


def job_names(env: Env) -> list[str]:
    return sorted(j["metadata"]["name"] for j in env.jobs())


def digest_tree(root: Path) -> dict[str, str]:
    return {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in tree(root)}


def test_happy_path_tp2_pp2(env: Env) -> None:
    """Apply, see progress in status.progress and the PROGRESS column, `kubectl wait` for Succeeded, find the
    checkpoint on the destination volume."""
    env.kubelet.hold_at_progress(5)
    env.apply(conversion("llama", destination="llama/tp2-pp2", vocab={"trueSize": 997}))
    body = env.wait("llama", has("Accepted", reason="JobCreated"), what="Accepted=True")
    [job] = env.jobs()
    assert body["status"]["jobName"] == job["metadata"]["name"]
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("CheckpointConversion", body["metadata"]["uid"],
                                                                  True)
    run = env.kubelet.wait_held(timeout=60)
    # the converter ran with the arguments the operator rendered (mount paths mapped to the test's volume dirs)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert run.pod_argv == ["ms2mg", *args]
    assert args[:5] == ["convert", "--load-dir", f"/mnt/source/{SAMPLE_PATH}", "--save-dir",
                        "/mnt/destination/llama/tp2-pp2"]
    # progress: from the pod log, read by the operator through the API server (pods/log -> fake kubelet)
    body = env.wait("llama", lambda b: b.get("status", {}).get("progress") == f"5/{SAMPLE_GROUPS}", timeout=40,
                    what="status.progress 5/12")
    assert has("Running", reason="Converting")(body)
    assert phase(body) == "Running" and ready(body) == ("False", "Converting")
    table = env.kubectl("get", "ckptconv", "llama").stdout.split("\n")
    assert table[0].split() == ["NAME", "STATUS", "REASON", "TP", "PP", "PROGRESS", "AGE"]
    assert table[1].split()[:6] == ["llama", "Running", "Converting", "2", "2", f"5/{SAMPLE_GROUPS}"]
    logs = env.kubectl("logs", f"job/{job['metadata']['name']}", "--tail=1").stdout
    assert json.loads(logs)["done"] == 5

    env.kubelet.release()
    env.kubectl("wait", "--for=condition=Succeeded", "ckptconv/llama", "--timeout=120s", timeout=130)
    body = env.must_get("llama")
    assert summary(body) == [("Accepted", "True", "JobCreated"), ("Running", "False", "JobFinished"),
                             ("Verified", "True", "Verified"), ("Succeeded", "True", "Converted")]
    assert phase(body) == "Succeeded" and ready(body) == ("True", "Converted")
    assert [c["type"] for c in body["status"]["conditions"]][:2] == ["Ready", "Accepted"]  # no Reconciling/Stalled
    assert not body["metadata"].get("finalizers")
    result = body["status"]["result"]
    assert result["verified"] is True and result["files"] == 6 and result["bytes"] > 0
    assert result["paddedVocabSize"] == 1024  # 997 rows kept, padded to a multiple of 128 x TP 2
    assert result["manifestPath"].endswith("llama/tp2-pp2/ms2mg-manifest.json")
    assert body["status"]["startTime"] and body["status"]["completionTime"]
    assert tree(env.destination / "llama/tp2-pp2") == megatron_files(2, 2)
    assert (env.destination / "llama/tp2-pp2/latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert run.exit_code == 0 and len(env.kubelet.runs) == 1 and env.kubelet.errors == []
    assert len(env.jobs()) == 1
    reasons = [(e["type"], e["reason"]) for e in events_for(env.cluster, env.namespace, "llama")]
    assert ("Normal", "JobCreated") in reasons and ("Normal", "Converted") in reasons
    # the final progress is recorded too (the finished pod's log is read once more)
    table = env.kubectl("get", "ckptconv").stdout.split("\n")
    assert table[1].split()[:6] == ["llama", "Succeeded", "Converted", "2", "2", f"{SAMPLE_GROUPS}/{SAMPLE_GROUPS}"]


def test_invalid_spec_is_rejected_without_a_job(env: Env) -> None:
    """A spec the schema cannot judge (TP 3 does not divide 8 heads / 4 groups): Accepted=False with a reason and
    message, one Warning Event, no Job, no retry loop. A spec the schema can judge never reaches the operator."""
    env.apply(conversion("tp3", tensor=3, pipeline=1))
    body = env.wait("tp3", has("Accepted", "False", "ParallelismMismatch"), what="Accepted=False")
    assert summary(body) == [("Accepted", "False", "ParallelismMismatch")]
    assert phase(body) == "Rejected" and has("Stalled", reason="ParallelismMismatch")(body)
    message = condition(body, "Accepted")["message"]  # type: ignore[index]
    assert "num_attention_heads (8) is not divisible by tensor parallel size (3)" in message
    assert "num_query_groups (4)" in message
    table = env.kubectl("get", "ckptconv", "tp3").stdout.split("\n")
    assert table[1].split()[:5] == ["tp3", "Rejected", "ParallelismMismatch", "3", "1"]
    time.sleep(4)  # no retry loop: still one Event and no Job a while later
    warnings = [e for e in events_for(env.cluster, env.namespace, "tp3") if e["type"] == "Warning"]
    assert [(e["reason"], e.get("count", 1)) for e in warnings] == [("ParallelismMismatch", 1)]
    assert env.jobs() == [] and env.kubelet.runs == {}
    assert "Traceback" not in env.operator.log_text()

    # rejected by the API server (CEL rule of the CRD) before the operator sees it
    bad = conversion("escape", destination="../../etc")
    proc = env.cluster.kubectl("create", "-f", "-", input=json.dumps(bad), namespace=env.namespace, check=False)
    assert proc.returncode != 0
    assert "must not contain '.' or '..' segments" in proc.stderr
    assert env.get("escape") is None


def test_converter_failure_is_reported(env: Env) -> None:
    """A wrong numLayers: the converter exits 3 (ShapeMismatch) and its own message lands in the Failed
    condition. backoffLimit 0: on Kubernetes 1.20 `podFailurePolicy` (FailJob on exit codes 2-5) is dropped by the
    server, so the default backoffLimit would retry a bad input; the rendering tests cover the policy."""
    env.apply(conversion("bad-layers", model={"numLayers": 6}, backoffLimit=0))
    env.kubectl("wait", "--for=condition=Failed", "ckptconv/bad-layers", "--timeout=90s", timeout=100)
    body = env.must_get("bad-layers")
    assert summary(body) == [("Accepted", "True", "JobCreated"), ("Running", "False", "JobFinished"),
                             ("Succeeded", "False", "ShapeMismatch"), ("Failed", "True", "ShapeMismatch")]
    failed = condition(body, "Failed")
    assert failed is not None
    assert "--num-layers 6 but the tensors say 4" in failed["message"]
    assert body["status"]["result"]["exitCode"] == 3 and body["status"]["result"]["status"] == "Failed"
    [run] = env.kubelet.runs.values()
    assert run.exit_code == 3
    [job] = env.jobs()
    job_failed = [c for c in job["status"].get("conditions", []) if c["type"] == "Failed"]
    assert job_failed and job_failed[0]["reason"] == "BackoffLimitExceeded"  # the real Job controller's verdict
    assert tree(env.destination) == []  # nothing written
    warnings = [e["reason"] for e in events_for(env.cluster, env.namespace, "bad-layers") if e["type"] == "Warning"]
    assert warnings == ["ShapeMismatch"]
    table = env.kubectl("get", "ckptconv", "bad-layers").stdout.split("\n")
    assert table[1].split()[1:3] == ["Failed", "ShapeMismatch"]
    assert has("Stalled", reason="ShapeMismatch")(body) and ready(body) == ("False", "ShapeMismatch")


def _job_complete(env: Env, name: str) -> bool:
    job = next((j for j in env.jobs() if j["metadata"]["name"] == name), None)
    return job is not None and any(c["type"] == "Complete" and c["status"] == "True"
                                   for c in job.get("status", {}).get("conditions", []))


def test_operator_restart_mid_run(env: Env) -> None:
    """SIGKILL the operator while the Job runs and start it again (twice): no second Job, and the conversion ends
    Succeeded with the converter's result, also when the Job finished while no operator was running."""
    env.kubelet.hold_at_progress(3)
    env.apply(conversion("restart"))
    run = env.kubelet.wait_held()
    body = env.wait("restart", has("Running", reason="Converting"), what="Running=True")
    job = body["status"]["jobName"]

    env.operator.kill()  # crash while converting, restart while it still converts
    env.operator.start()
    time.sleep(3)
    body = env.wait("restart", has("Running", reason="Converting"))
    assert [j["metadata"]["name"] for j in env.jobs()] == [job]
    assert condition(body, "Accepted")["reason"] == "JobCreated"  # type: ignore[index]

    env.operator.kill()  # crash again; the Job finishes while no operator runs
    env.kubelet.release()
    assert run.finished.wait(60) and run.exit_code == 0
    wait_for(lambda: _job_complete(env, job), timeout=30, what="the Job's Complete condition (KCM)")
    before = env.get("restart")
    assert not has("Succeeded")(before or {})  # nobody has written it yet
    env.operator.start()
    body = env.wait("restart", has("Succeeded", reason="Converted"), what="Succeeded after the restart")
    assert has("Verified", reason="Verified")(body)
    assert body["status"]["result"]["files"] == 6 and body["status"]["jobName"] == job
    assert [j["metadata"]["name"] for j in env.jobs()] == [job]
    assert len(env.kubelet.runs) == 1 and env.operator.starts == 3
    assert tree(env.destination / "out/restart") == megatron_files(2, 2)


def test_spec_change_replaces_the_running_job(env: Env) -> None:
    """A new generation while the first Job runs: the old Job is deleted (its converter stopped, nothing
    committed), a new Job runs the new spec, and the status describes generation 2 only."""
    env.kubelet.hold_at_progress(2)
    env.apply(conversion("change", destination="out/change"))
    first = env.kubelet.wait_held()
    body = env.wait("change", has("Running", reason="Converting"))
    old_job = body["status"]["jobName"]
    env.kubelet.hold_when(None)  # the new generation runs through (the first stays frozen until killed)
    env.kubectl("patch", "ckptconv", "change", "--type=merge",
                "-p", json.dumps({"spec": {"parallelism": {"tensor": 1, "pipeline": 1}}}))
    body = env.wait("change", has("Succeeded", reason="Converted", generation=2), timeout=90,
                    what="generation 2 Succeeded")
    assert body["metadata"]["generation"] == 2 and body["status"]["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in body["status"]["conditions"])
    assert body["status"]["jobName"] != old_job
    [job] = env.jobs()
    assert job["metadata"]["name"] == body["status"]["jobName"]
    assert job["metadata"]["labels"]["ms2mg.io/generation"] == "2"
    assert first.finished.wait(30) and first.killed and first.exit_code != 0
    assert tree(env.destination / "out/change") == megatron_files(1, 1)
    assert [p.name for p in (env.destination / "out").iterdir()] == ["change"]  # no staging left behind
    assert len(env.kubelet.runs) == 2


def test_spec_change_waits_for_the_old_pod_in_its_commit(env: Env) -> None:
    """Issue 11: the old pod is inside its commit (it ignores SIGTERM until its checkpoint is in place) when the
    spec changes. The old Job is deleted in the foreground, and no Job of generation 2 exists while the old pod
    does (Accepted=False WaitingForPreviousJob); once it has landed its checkpoint and is gone, generation 2 runs
    and (overwrite: true) replaces that checkpoint. Before, the new Job started at once beside the old pod."""
    env.kubelet.hold_at_progress(SAMPLE_GROUPS)  # the last group is written: verification and commit follow
    env.apply(conversion("commit", destination="out/commit", overwrite=True))
    first = env.kubelet.wait_held()
    env.kubelet.shield(first)  # from now on it behaves as inside its commit
    body = env.wait("commit", has("Running", reason="Converting"))
    old_job = body["status"]["jobName"]
    env.kubelet.hold_when(None)
    env.kubectl("patch", "ckptconv", "commit", "--type=merge",
                "-p", json.dumps({"spec": {"parallelism": {"tensor": 1, "pipeline": 1}}}))
    body = env.wait("commit", has("Accepted", "False", "WaitingForPreviousJob", generation=2),
                    what="generation 2 waiting for the old pod")
    assert phase(body) == "Waiting" and has("Reconciling", reason="WaitingForPreviousJob")(body)
    wait_for(first.deletion_seen.is_set, timeout=60, what="the old pod marked for deletion (foreground GC)")
    [old] = env.jobs()  # only the old Job, being deleted in the foreground: no Job of generation 2
    assert old["metadata"]["name"] == old_job and old["metadata"].get("deletionTimestamp")
    assert "foregroundDeletion" in old["metadata"].get("finalizers", [])
    assert len(env.kubelet.runs) == 1 and not first.is_finished
    assert has("Accepted", "False", "WaitingForPreviousJob")(env.must_get("commit"))

    env.kubelet.release(first)  # the old run finishes its commit by itself, then its pod is removed
    body = env.wait("commit", has("Succeeded", reason="Converted", generation=2), timeout=120,
                    what="generation 2 Succeeded")
    assert first.exit_code == 0 and not first.killed  # generation 1 landed its checkpoint ...
    [second] = [r for r in env.kubelet.runs.values() if r is not first]
    assert first.lines[-1][0] < second.lines[0][0]  # ... before generation 2 printed its first line
    assert tree(env.destination / "out/commit") == megatron_files(1, 1)  # ... and generation 2 replaced it
    assert [j["metadata"]["labels"]["ms2mg.io/generation"] for j in env.jobs()] == ["2"]


def test_delete_while_the_operator_is_down(env: Env) -> None:
    """Issue 11: the operator sets no finalizer, so a resource deleted while no operator runs goes at once (its Job
    and pod garbage-collected by KCM). A finalizer an older operator version left (`ms2mg.io/kopf-finalizer`) is
    removed by the next operator start, also from a resource deleted meanwhile."""
    env.apply(conversion("old", destination="out/old", tensor=1, pipeline=1))
    env.kubectl("wait", "--for=condition=Succeeded", "ckptconv/old", "--timeout=90s", timeout=100)
    env.kubelet.hold_at_progress(3)
    env.apply(conversion("orphan"))
    run = env.kubelet.wait_held()
    body = env.wait("orphan", has("Running", reason="Converting"))
    assert not body["metadata"].get("finalizers")
    env.operator.stop()
    env.kubectl("patch", "ckptconv", "old", "--type=merge",
                "-p", '{"metadata":{"finalizers":["ms2mg.io/kopf-finalizer"]}}')  # as an older version left it

    env.kubectl("delete", "ckptconv", "orphan", "--timeout=30s", timeout=40)  # returns: nothing holds it
    assert env.get("orphan") is None
    wait_for(lambda: not [j for j in env.jobs() if j["metadata"]["labels"]["ms2mg.io/conversion"] == "orphan"],
             timeout=60, what="the orphan's Job garbage-collected")
    assert run.finished.wait(30) and run.killed
    env.kubectl("delete", "ckptconv", "old", "--wait=false")
    assert (env.get("old") or {}).get("metadata", {}).get("deletionTimestamp")  # held by the leftover finalizer
    env.operator.start()
    wait_for(lambda: env.get("old") is None, timeout=60, what="the leftover finalizer removed by the operator")


def test_delete_garbage_collects_jobs_and_keeps_data(env: Env) -> None:
    """Deleting a resource: its Job and pod are garbage-collected by kube-controller-manager; the converted data
    stays. Deleting one that is still converting stops the converter, which leaves nothing at its destination."""
    env.apply(conversion("done"))
    env.kubectl("wait", "--for=condition=Succeeded", "ckptconv/done", "--timeout=90s", timeout=100)
    before = digest_tree(env.destination)
    assert len(before) == len(megatron_files(2, 2))
    env.kubelet.hold_at_progress(4)
    env.apply(conversion("running"))
    running = env.kubelet.wait_held()
    assert len(env.jobs()) == 2

    env.kubectl("delete", "ckptconv", "done", "running", "--timeout=60s", timeout=70)
    wait_for(lambda: not env.jobs() and not env.pods(), timeout=60, what="Jobs and pods garbage-collected")
    assert running.finished.wait(30) and running.killed
    assert digest_tree(env.destination) == before  # converted data untouched, nothing from the stopped run
    assert [p.name for p in (env.destination / "out").iterdir()] == ["done"]


def test_destination_conflict_waits_for_the_older_resource(env: Env) -> None:
    """Two resources writing the same destination: the newer one waits (Accepted=False DestinationConflict, no
    Job) until the older one is deleted, then runs (here with overwrite: true, over the older one's output)."""
    env.apply(conversion("first", destination="out/shared"))
    env.wait("first", has("Accepted", reason="JobCreated"))
    env.apply(conversion("second", destination="out/shared", overwrite=True))
    body = env.wait("second", has("Accepted", "False", "DestinationConflict"))
    assert "older CheckpointConversion first" in condition(body, "Accepted")["message"]  # type: ignore[index]
    env.kubectl("wait", "--for=condition=Succeeded", "ckptconv/first", "--timeout=90s", timeout=100)
    time.sleep(3)
    assert has("Accepted", "False", "DestinationConflict")(env.get("second") or {})
    assert phase(env.get("second")) == "Waiting"
    assert [j["metadata"]["labels"]["ms2mg.io/conversion"] for j in env.jobs()] == ["first"]
    warnings = [e["reason"] for e in events_for(env.cluster, env.namespace, "second") if e["type"] == "Warning"]
    assert warnings == ["DestinationConflict"]

    env.kubectl("delete", "ckptconv", "first", "--timeout=60s", timeout=70)
    # the deletion event makes the waiting resources of the namespace re-check at once
    env.wait("second", has("Accepted", reason="JobCreated"), timeout=45, what="second accepted")
    env.kubectl("wait", "--for=condition=Succeeded", "ckptconv/second", "--timeout=90s", timeout=100)
    assert tree(env.destination / "out/shared") == megatron_files(2, 2)


def test_kueue_queue_name(env: Env) -> None:
    """spec.queueName: the Job carries the Kueue queue label, and the operator derives Queued from the Job as the
    server returns it. Kubernetes 1.20 drops `spec.suspend` (added in 1.21), so here the Job is not suspended and
    the operator reports Queued=False/Admitted and the conversion runs; on a server that keeps `suspend` the same
    code reports Queued=True/WaitingForAdmission until Kueue unsuspends the Job (covered with kmock in
    tests/operator/test_handlers.py::test_kueue_queued_job, and the rendered `suspend: true` in
    tests/operator/test_jobs.py)."""
    env.apply(conversion("queued", queueName="team-a"))
    body = env.wait("queued", has("Accepted", reason="JobCreated"))
    [job] = env.jobs()
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    # what the operator sent: the rendered Job is suspended ...
    conv = CheckpointConversion.model_validate(body)
    assert render_job(conv, OperatorSettings(converter_image="x"))["spec"]["suspend"] is True  # type: ignore[index]
    if job["spec"].get("suspend") is True:  # a server that knows `suspend` (>= 1.21)
        env.wait("queued", has("Queued", reason="WaitingForAdmission"))
        env.kubectl("patch", "job", job["metadata"]["name"], "--type=merge", "-p", '{"spec":{"suspend":false}}')
    else:  # ... and Kubernetes 1.20 dropped it: not suspended, so admitted at once
        assert "suspend" not in job["spec"]
    env.kubectl("wait", "--for=condition=Succeeded", "ckptconv/queued", "--timeout=90s", timeout=100)
    assert has("Queued", "False", "Admitted")(env.must_get("queued"))


def test_missing_pvc(k8s_cluster: Cluster, ms2mg_crd: str, k8s_namespace: str,
                     sample_volume: Path, tmp_path: Path) -> None:
    """A missing destination (or source) PVC: Accepted=False with a reason naming it, no Job stuck Pending; once
    the PVC exists, the conversion starts (re-checked every MS2MG_RECHECK_SECONDS, 2 s in these tests)."""
    with operator_env(k8s_cluster, k8s_namespace, sample_volume, tmp_path, pvcs=(SOURCE_PVC,)) as env:
        env.apply(conversion("no-dest"), conversion("no-source", source_pvc="nope", destination="out/x"))
        body = env.wait("no-dest", has("Accepted", "False", "DestinationPVCNotFound"))
        assert condition(body, "Accepted")["message"] == (  # type: ignore[index]
            f"PersistentVolumeClaim {env.namespace}/{DEST_PVC} does not exist")
        body = env.wait("no-source", has("Accepted", "False", "SourcePVCNotFound"))
        assert f"{env.namespace}/nope" in condition(body, "Accepted")["message"]  # type: ignore[index]
        assert env.jobs() == []
        warnings = [e["reason"] for e in events_for(env.cluster, env.namespace, "no-dest") if e["type"] == "Warning"]
        assert warnings == ["DestinationPVCNotFound"]
        create_pvcs(env.cluster, env.namespace, DEST_PVC)
        env.wait("no-dest", has("Accepted", reason="JobCreated"), timeout=45, what="accepted once the PVC exists")
        env.kubectl("wait", "--for=condition=Succeeded", "ckptconv/no-dest", "--timeout=90s", timeout=100)
        assert has("Accepted", "False", "SourcePVCNotFound")(env.get("no-source") or {})
        assert [j["metadata"]["labels"]["ms2mg.io/conversion"] for j in env.jobs()] == ["no-dest"]


README = Path(__file__).resolve().parents[2] / "README.md"
WALK_START, WALK_END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"


def _rows_without_age(text: str) -> list[list[str]]:
    return [line.split()[:-1] for line in text.strip().splitlines() if not line.startswith(("$", "```"))]


def test_readme_walkthrough(env: Env) -> None:
    """The `kubectl get ckptconv` output shown in README.md is what this cluster prints (AGE aside).

    `UPDATE_README=1 .venv/bin/pytest tests/integration/test_operator.py -k readme` rewrites the README block."""
    import os

    env.kubelet.hold_at_progress(7)
    env.apply(conversion("llama-tiny-tp2-pp2", destination="llama-tiny/tp2-pp2", vocab={"trueSize": 997}))
    env.kubelet.wait_held(timeout=60)
    env.wait("llama-tiny-tp2-pp2", lambda b: b.get("status", {}).get("progress") == f"7/{SAMPLE_GROUPS}",
             timeout=40, what="progress 7")
    during = env.kubectl("get", "ckptconv").stdout
    env.kubelet.release()
    wait = env.kubectl("wait", "--for=condition=Succeeded", "ckptconv/llama-tiny-tp2-pp2", "--timeout=120s",
                       timeout=130).stdout
    after = env.kubectl("get", "ckptconv").stdout
    block = "\n".join(["```", "$ kubectl get ckptconv", during.rstrip(), "$ kubectl wait --for=condition=Succeeded "
                       "ckptconv/llama-tiny-tp2-pp2 --timeout=2h", wait.rstrip(), "$ kubectl get ckptconv",
                       after.rstrip(), "```"])
    text = README.read_text()
    start, end = text.index(WALK_START) + len(WALK_START), text.index(WALK_END)
    if os.environ.get("UPDATE_README"):
        README.write_text(text[:start] + "\n" + block + "\n" + text[end:])
        text = README.read_text()
        start, end = text.index(WALK_START) + len(WALK_START), text.index(WALK_END)
    shown = [r for r in _rows_without_age(text[start:end]) if r and r[0] in ("NAME", "llama-tiny-tp2-pp2")]
    got = [r for r in _rows_without_age(during + "\n" + after) if r]
    assert shown == got, f"README.md's walkthrough output is stale; regenerate it with UPDATE_README=1 ({got})"
