"""The fake kubelet (tests/k8s/kubelet.py) against the real control plane: binding, running, pod status, the Job
controller's reaction, logs through the API server (mutual TLS), deletion, entrypoints by image, ServiceAccount
tokens, capacity. The programs run here are small Python scripts mapped in ``FakeKubelet.commands``/``images``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.cluster import Cluster, wait_for
from tests.k8s.kubelet import FakeKubelet

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

SELECTOR = "test.ms2mg.io/fake-kubelet=yes"
# a tiny program: prints lines, reads the file named by --read, writes --message into --termination, exits --code
TOOL = r"""
import argparse, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--read"); p.add_argument("--termination"); p.add_argument("--message", default="")
p.add_argument("--code", type=int, default=0); p.add_argument("--sleep", type=float, default=0)
p.add_argument("--lines", type=int, default=3)
a = p.parse_args()
for i in range(a.lines):
    print(f"line {i}", flush=True)
if a.read:
    print("read:", open(a.read).read().strip(), flush=True)
print("env:", os.environ.get("POD_NAMESPACE"), os.environ.get("GREETING"), flush=True)
time.sleep(a.sleep)
if a.termination:
    open(a.termination, "w").write(a.message)
sys.exit(a.code)
"""
WHOAMI = r"""
import json, os, ssl, urllib.request, urllib.error
import yaml
cfg = yaml.safe_load(open(os.environ["KUBECONFIG"]))
cluster, user = cfg["clusters"][0]["cluster"], cfg["users"][0]["user"]
token = open(user["tokenFile"]).read()
ns = cfg["contexts"][0]["context"]["namespace"]
ctx = ssl.create_default_context(cafile=cluster["certificate-authority"])
req = urllib.request.Request(cluster["server"] + f"/api/v1/namespaces/{ns}/pods",
                             headers={"Authorization": "Bearer " + token})
try:
    urllib.request.urlopen(req, context=ctx)
    print("list pods: allowed")
except urllib.error.HTTPError as e:
    print("list pods:", e.code, json.loads(e.read())["message"])
"""


@pytest.fixture
def kubelet(k8s_cluster: Cluster, k8s_namespace: str, tmp_path: Path) -> Iterator[FakeKubelet]:
    data = tmp_path / "claim"
    data.mkdir()
    (data / "hello.txt").write_text("hello from the volume\n")
    with FakeKubelet(k8s_cluster, namespace=k8s_namespace, label_selector=SELECTOR, capacity=2,
                     volumes={"data": data}, workdir=tmp_path / "kubelet",
                     commands={"tool": [sys.executable, "-c", TOOL]},
                     images={"example.org/whoami": [sys.executable, "-c", WHOAMI]}) as k:
        yield k


def job(name: str, args: list[str], **pod: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never", "automountServiceAccountToken": False,
        "containers": [{"name": "main", "image": "example.org/tool:1", "command": ["tool"], "args": args,
                        "env": [{"name": "GREETING", "value": "hi"},
                                {"name": "POD_NAMESPACE",
                                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True},
                                         {"name": "tmp", "mountPath": "/tmp"}]}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                    {"name": "tmp", "emptyDir": {}}]}
    spec.update(pod)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"test.ms2mg.io/fake-kubelet": "yes"}},
                                                     "spec": spec}}}


def job_condition(cluster: Cluster, ns: str, name: str, kind: str) -> bool:
    status = cluster.kubectl_json("get", "job", name, namespace=ns).get("status", {})
    return any(c["type"] == kind and c["status"] == "True" for c in status.get("conditions", []))


def test_runs_a_pod_like_a_kubelet(k8s_cluster: Cluster, k8s_namespace: str, kubelet: FakeKubelet) -> None:
    ns = k8s_namespace
    k8s_cluster.apply(job("ok", ["--read", "/data/hello.txt", "--termination", "/dev/termination-log",
                                 "--message", "all good", "--lines", "5"]), namespace=ns)
    run = kubelet.wait_for_run(lambda r: r.is_finished, timeout=60)
    assert run.exit_code == 0 and run.termination_message == "all good"
    assert run.pod_argv[0] == "tool" and "/data/hello.txt" in run.pod_argv
    assert str(kubelet.volumes["data"] / "hello.txt") in run.argv  # mount path mapped to the claim's directory
    wait_for(lambda: job_condition(k8s_cluster, ns, "ok", "Complete"), timeout=30, what="Job Complete (KCM)")
    pod = k8s_cluster.kubectl_json("get", "pod", run.name, namespace=ns)
    assert pod["spec"]["nodeName"] == kubelet.node_name
    assert pod["status"]["phase"] == "Succeeded"
    [status] = pod["status"]["containerStatuses"]
    terminated = status["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"], terminated["message"]) == (0, "Completed", "all good")
    assert terminated["startedAt"] and terminated["finishedAt"]
    node = k8s_cluster.kubectl_json("get", "node", kubelet.node_name)
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == kubelet.port
    # logs through the API server, proxied to the fake kubelet (mutual TLS, CA-verified)
    logs = k8s_cluster.kubectl("logs", run.name, namespace=ns).stdout.splitlines()
    assert logs[:5] == [f"line {i}" for i in range(5)]
    assert "read: hello from the volume" in logs and "env: " + ns + " hi" in logs
    tail = k8s_cluster.kubectl("logs", run.name, "--tail=1", "--timestamps", namespace=ns).stdout
    assert tail.rstrip().endswith("hi") and tail.split()[0].startswith("20")
    raw = k8s_cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/{run.name}/log?tailLines=2&limitBytes=6")
    assert raw.stdout == "read: "
    assert kubelet.errors == []


def test_failure_falls_back_to_logs(k8s_cluster: Cluster, k8s_namespace: str, kubelet: FakeKubelet) -> None:
    body = job("fails", ["--code", "7"])
    body["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    k8s_cluster.apply(body, namespace=k8s_namespace)
    run = kubelet.wait_for_run(lambda r: r.is_finished, timeout=60)
    assert run.exit_code == 7
    assert run.termination_message is not None and run.termination_message.startswith("line 0\n")
    wait_for(lambda: job_condition(k8s_cluster, k8s_namespace, "fails", "Failed"), timeout=30, what="Job Failed")
    pod = k8s_cluster.kubectl_json("get", "pod", run.name, namespace=k8s_namespace)
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "Error"


def test_deleting_stops_the_process(k8s_cluster: Cluster, k8s_namespace: str, kubelet: FakeKubelet) -> None:
    kubelet.hold_when(lambda run, line: line == "line 1")
    k8s_cluster.apply(job("held", ["--sleep", "60"]), namespace=k8s_namespace)
    run = kubelet.wait_held()
    assert run.log_text() == "line 0\nline 1\n"  # frozen right after that line
    k8s_cluster.kubectl("delete", "job", "held", "--cascade=background", namespace=k8s_namespace)
    assert run.finished.wait(30) and run.killed and run.exit_code == 128 + 15  # SIGTERM
    wait_for(lambda: not k8s_cluster.kubectl_json("get", "pods", namespace=k8s_namespace)["items"], timeout=30,
             what="pod removed after its graceful deletion")


def test_capacity(k8s_cluster: Cluster, k8s_namespace: str, kubelet: FakeKubelet) -> None:
    kubelet.hold_when(lambda run, line: line == "line 0")
    k8s_cluster.apply([job(f"j{i}", []) for i in range(3)], namespace=k8s_namespace)
    kubelet.wait_for_run(lambda r: r.held.is_set(), timeout=60)
    time.sleep(2)
    pods = k8s_cluster.kubectl_json("get", "pods", namespace=k8s_namespace)["items"]
    bound = [p for p in pods if p["spec"].get("nodeName")]
    assert len(pods) == 3 and len(bound) == 2  # capacity 2: the third stays Pending, unbound
    kubelet.release()
    wait_for(lambda: len([r for r in kubelet.runs.values() if r.is_finished]) == 3, timeout=60,
             what="all three run")


def test_entrypoint_by_image_with_service_account_token(k8s_cluster: Cluster, k8s_namespace: str,
                                                        kubelet: FakeKubelet) -> None:
    """A container without a command runs the program mapped to its image; with automountServiceAccountToken the
    process talks to the API as the pod's ServiceAccount (here without RBAC: 403)."""
    ns = k8s_namespace
    k8s_cluster.create_service_account(ns, "robot")
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "whoami", "labels": {"test.ms2mg.io/fake-kubelet": "yes"}},
           "spec": {"restartPolicy": "Never", "serviceAccountName": "robot",
                    "containers": [{"name": "main", "image": "example.org/whoami:2.0@sha256:" + "0" * 64}]}}
    k8s_cluster.apply(pod, namespace=ns)
    run = kubelet.wait_for_run(lambda r: r.is_finished, timeout=60)
    assert run.exit_code == 0, run.log_text()
    assert f'system:serviceaccount:{ns}:robot" cannot list resource "pods"' in run.log_text()
    assert json.loads((run.workdir / "serviceaccount" / "kubeconfig").read_text())["contexts"][0]["context"][
        "namespace"] == ns
