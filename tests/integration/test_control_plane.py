"""Smoke tests of the local control plane (etcd + kube-apiserver 1.20 + apiextensions-apiserver 1.36 + KCM 1.20).

They prove what the operator's integration tests rely on: the server versions, CRDs with CEL rules and strict field
validation (1.36), the Job controller and garbage collector (KCM), /status patches, ServiceAccount tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.cluster import Cluster, KubectlError, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

SMOKE_GROUP = "smoke.ms2mg.io"  # deliberately NOT ms2mg.io: the operator's own CRD stays untouched
SMOKE_CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.{SMOKE_GROUP}
spec:
  group: {SMOKE_GROUP}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget}}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {{status: {{}}}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - rule: "self.minReplicas <= self.maxReplicas"
              message: "minReplicas must be <= maxReplicas"
            - rule: "!has(oldSelf.image) || self.image == oldSelf.image"
              message: "image is immutable"
            properties:
              image: {{type: string}}
              minReplicas: {{type: integer}}
              maxReplicas: {{type: integer}}
          status:
            type: object
            properties:
              phase: {{type: string}}
"""


def widget(name: str, **spec: Any) -> str:
    return json.dumps({"apiVersion": f"{SMOKE_GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec})


@pytest.fixture(scope="module")
def smoke_crd(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("smoke-crd") / "crd.yaml"
    path.write_text(SMOKE_CRD)
    (name,) = k8s_cluster.apply_crd(path)
    # KCM's garbage collector only rediscovers resource types every 30 s: restart it (~1 s) so that it knows Widgets
    k8s_cluster.restart_controller_manager()
    yield name
    k8s_cluster.delete_crd(name)


def test_server_versions(k8s_cluster: Cluster) -> None:
    assert k8s_cluster.server_version() == "v1.20.2"
    assert k8s_cluster.crd_server_version().startswith("v1.36.")
    out = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == "v1.20.2"


def test_default_namespaces_exist(k8s_cluster: Cluster) -> None:
    names = {ns["metadata"]["name"] for ns in k8s_cluster.kubectl_json("get", "namespaces")["items"]}
    assert {"default", "kube-system", "kube-public", "kube-node-lease"} <= names


def test_crd_cel_rules_enforced(k8s_cluster: Cluster, smoke_crd: str, k8s_namespace: str) -> None:
    crd = k8s_cluster.kubectl_json("get", "crd", smoke_crd)
    rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    assert len(rules) == 2  # stored by the 1.36 server (1.20 would prune the field)

    bad = k8s_cluster.kubectl(
        "create", "-f", "-", input=widget("w-bad", minReplicas=5, maxReplicas=2), namespace=k8s_namespace, check=False
    )
    assert bad.returncode != 0
    assert "minReplicas must be <= maxReplicas" in bad.stderr

    k8s_cluster.kubectl(
        "create", "-f", "-", input=widget("w1", image="a:1", minReplicas=1, maxReplicas=2), namespace=k8s_namespace
    )
    immutable = k8s_cluster.kubectl(
        "patch", "widget", "w1", "--type=merge", "-p", '{"spec":{"image":"b:2"}}', namespace=k8s_namespace, check=False
    )
    assert immutable.returncode != 0
    assert "image is immutable" in immutable.stderr

    # the status subresource of the custom resource
    k8s_cluster.kubectl(
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"phase":"Ready"}}',
        namespace=k8s_namespace,
    )
    assert k8s_cluster.kubectl_json("get", "widget", "w1", namespace=k8s_namespace)["status"]["phase"] == "Ready"


def test_strict_field_validation(k8s_cluster: Cluster, smoke_crd: str, k8s_namespace: str) -> None:
    doc = widget("w-strict", image="a:1", minReplicas=1, maxReplicas=1, bogus=1)
    # the 1.36 CRD server itself: fieldValidation=Strict, sent as is (no client-side validation in between)
    path = f"/apis/{SMOKE_GROUP}/v1/namespaces/{k8s_namespace}/widgets?fieldValidation=Strict"
    strict = k8s_cluster.kubectl("create", "--raw", path, "-f", "-", input=doc, check=False)
    assert strict.returncode != 0
    assert 'unknown field "spec.bogus"' in strict.stderr
    # kubectl --validate=strict refuses it too: client-side once the 1.20 aggregator publishes the CRD's OpenAPI
    # schema (it refreshes it on its own schedule), else through the server as above
    client = k8s_cluster.kubectl(
        "create", "--validate=strict", "-f", "-", input=doc, namespace=k8s_namespace, check=False
    )
    assert client.returncode != 0
    assert 'unknown field "spec.bogus"' in client.stderr or 'unknown field "bogus"' in client.stderr
    # without strict validation the server prunes the unknown field (structural schema)
    k8s_cluster.kubectl("create", "--validate=false", "-f", "-", input=doc, namespace=k8s_namespace)
    spec = k8s_cluster.kubectl_json("get", "widget", "w-strict", namespace=k8s_namespace)["spec"]
    assert "bogus" not in spec


def _job(name: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {
                "backoffLimit": 0,
                **spec,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
                    }
                },
            },
        }
    )


def _job_pod(k8s_cluster: Cluster, ns: str, job: str) -> dict[str, Any]:
    def pod() -> dict[str, Any] | None:
        items = k8s_cluster.kubectl_json("get", "pods", "-l", f"job-name={job}", namespace=ns)["items"]
        return items[0] if items else None

    return wait_for(pod, timeout=30, what=f"a pod of Job {job}")


def _conditions(obj: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}


def test_job_controller_creates_pod_and_pod_status_drives_job(k8s_cluster: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    # newer Job fields: ttlSecondsAfterFinished survives (TTLAfterFinished gate is on), 1.21+ fields are dropped
    k8s_cluster.kubectl(
        "create",
        "--validate=false",
        "-f",
        "-",
        namespace=ns,
        input=_job("j1", ttlSecondsAfterFinished=600, suspend=False, completionMode="NonIndexed"),
    )
    spec = k8s_cluster.kubectl_json("get", "job", "j1", namespace=ns)["spec"]
    assert spec["ttlSecondsAfterFinished"] == 600
    assert "suspend" not in spec and "completionMode" not in spec

    pod = _job_pod(k8s_cluster, ns, "j1")
    assert pod["status"]["phase"] == "Pending"  # no scheduler, no kubelet
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Job"

    # simulate the kubelet: the Job controller counts the pod and completes the Job
    name = pod["metadata"]["name"]
    k8s_cluster.kubectl(
        "patch",
        "pod",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"phase":"Succeeded"}}',
        namespace=ns,
    )
    job = wait_for(
        lambda: (
            (j := k8s_cluster.kubectl_json("get", "job", "j1", namespace=ns))
            and _conditions(j).get("Complete") == "True"
            and j
        ),
        timeout=30,
        what="Job j1 Complete",
    )
    assert job["status"]["succeeded"] == 1


def test_job_status_patch(k8s_cluster: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s_cluster.kubectl("create", "-f", "-", input=_job("j2"), namespace=ns)
    _job_pod(k8s_cluster, ns, "j2")
    # a terminal condition written directly to /status sticks (the Job controller leaves finished Jobs alone);
    # counters such as status.succeeded are recomputed from pods by the controller, patch pods for those
    k8s_cluster.kubectl(
        "patch",
        "job",
        "j2",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "status": {
                    "conditions": [
                        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "simulated"}
                    ]
                }
            }
        ),
        namespace=ns,
    )
    time.sleep(1)
    job = k8s_cluster.kubectl_json("get", "job", "j2", namespace=ns)
    assert _conditions(job).get("Failed") == "True"


def _gone(k8s_cluster: Cluster, ns: str, *ref: str) -> bool:
    return k8s_cluster.kubectl("get", *ref, namespace=ns, check=False).returncode != 0


def test_garbage_collection_builtin_owner(k8s_cluster: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    owner = k8s_cluster.kubectl_json("create", "configmap", "owner", namespace=ns)
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    job = json.loads(_job("owned-job"))
    job["metadata"]["ownerReferences"] = [ref]
    k8s_cluster.kubectl("create", "-f", "-", input=json.dumps(job), namespace=ns)
    _job_pod(k8s_cluster, ns, "owned-job")

    k8s_cluster.kubectl("delete", "configmap", "owner", namespace=ns)
    wait_for(lambda: _gone(k8s_cluster, ns, "job", "owned-job"), timeout=30, what="GC of the owned Job")
    wait_for(
        lambda: not k8s_cluster.kubectl_json("get", "pods", "-l", "job-name=owned-job", namespace=ns)["items"],
        timeout=30,
        what="GC of the Job's pod",
    )


def test_garbage_collection_custom_resource_owner(k8s_cluster: Cluster, smoke_crd: str, k8s_namespace: str) -> None:
    ns = k8s_namespace
    owner = json.loads(
        k8s_cluster.kubectl(
            "create",
            "-f",
            "-",
            "-o",
            "json",
            namespace=ns,
            input=widget("owner", image="a:1", minReplicas=1, maxReplicas=1),
        ).stdout
    )
    ref = {"apiVersion": f"{SMOKE_GROUP}/v1", "kind": "Widget", "name": "owner", "uid": owner["metadata"]["uid"]}
    k8s_cluster.kubectl(
        "create",
        "-f",
        "-",
        namespace=ns,
        input=json.dumps(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owned", "ownerReferences": [ref]}}
        ),
    )
    k8s_cluster.kubectl("delete", "widget", "owner", namespace=ns)
    wait_for(
        lambda: _gone(k8s_cluster, ns, "configmap", "owned"),
        timeout=30,
        what="GC of a ConfigMap owned by a custom resource",
    )


def test_service_account_token_kubeconfig(k8s_cluster: Cluster, k8s_namespace: str, tmp_path: Path) -> None:
    ns = k8s_namespace
    kubeconfig = k8s_cluster.sa_kubeconfig(ns, "bot", tmp_path / "bot.kubeconfig")
    who = f"system:serviceaccount:{ns}:bot"

    denied = k8s_cluster.kubectl("get", "configmaps", kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower() and who in denied.stderr

    k8s_cluster.kubectl(
        "create", "rolebinding", "bot-view", "--clusterrole=view", f"--serviceaccount={ns}:bot", namespace=ns
    )
    wait_for(
        lambda: k8s_cluster.kubectl("get", "configmaps", kubeconfig=kubeconfig, check=False).returncode == 0,
        timeout=15,
        what="RBAC for the ServiceAccount token",
    )
    with pytest.raises(KubectlError, match="forbidden"):
        k8s_cluster.kubectl("create", "configmap", "nope", kubeconfig=kubeconfig)


def test_helm_chart_with_cel_crd(k8s_cluster: Cluster, k8s_namespace: str, tmp_path: Path) -> None:
    # CRDs in crds/ are not validated by helm's client-side (1.20 OpenAPI) check; a CRD with
    # x-kubernetes-validations under templates/ would need --disable-openapi-validation
    chart = tmp_path / "chart"
    (chart / "crds").mkdir(parents=True)
    (chart / "templates").mkdir()
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: smoke\nversion: 0.1.0\n")
    group = f"helm.{SMOKE_GROUP}"
    (chart / "crds" / "crd.yaml").write_text(
        SMOKE_CRD.replace(f"widgets.{SMOKE_GROUP}", f"gadgets.{group}")
        .replace(f"group: {SMOKE_GROUP}", f"group: {group}")
        .replace("plural: widgets, singular: widget, kind: Widget", "plural: gadgets, singular: gadget, kind: Gadget")
    )
    (chart / "templates" / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: smoke-cm}\n")

    k8s_cluster.route_api_group(group, "v1")  # before the CRD exists
    k8s_cluster.helm("install", "smoke", str(chart), "-n", k8s_namespace, "--wait", "--timeout=60s")
    try:
        k8s_cluster.wait_crds_served(f"gadgets.{group}")
        assert k8s_cluster.kubectl_json("get", "configmap", "smoke-cm", namespace=k8s_namespace)
        bad = k8s_cluster.kubectl(
            "create", "-f", "-", namespace=k8s_namespace, check=False,
            input=json.dumps({"apiVersion": f"{group}/v1", "kind": "Gadget", "metadata": {"name": "g"},
                              "spec": {"minReplicas": 3, "maxReplicas": 1}}),
        )  # fmt: skip
        assert "minReplicas must be <= maxReplicas" in bad.stderr
        releases = json.loads(k8s_cluster.helm("list", "-n", k8s_namespace, "-o", "json", major=4).stdout)
        assert [r["name"] for r in releases] == ["smoke"]
        k8s_cluster.helm("uninstall", "smoke", "-n", k8s_namespace, major=4)
    finally:
        k8s_cluster.delete_crd(f"gadgets.{group}")  # helm never deletes CRDs from crds/
