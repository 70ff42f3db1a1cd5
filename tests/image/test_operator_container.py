"""The operator *image* against the test API server: `docker run` the built `operator` target (read-only root,
non-root, all capabilities dropped), point it at the test control plane, and watch it reconcile a
CheckpointConversion into a Job. The same code path as in a cluster, minus the Deployment around it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.image.conftest import Image
from tests.k8s.cluster import Cluster

pytestmark = [pytest.mark.image, pytest.mark.k8s, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "checkpointconversions.ms2mg.io.yaml"


def _docker(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=300, check=False)
    if check and proc.returncode:
        raise AssertionError(f"docker {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def _pvc(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": namespace},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}


def _conversion(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "ms2mg.io/v1alpha1", "kind": "CheckpointConversion",
            "metadata": {"name": "from-the-image", "namespace": namespace},
            "spec": {"source": {"pvc": "mindformers", "path": "llama"},
                     "destination": {"pvc": "megatron", "path": "llama/tp2-pp2"},
                     "parallelism": {"tensor": 2, "pipeline": 2},
                     "model": {"numAttentionHeads": 8, "numQueryGroups": 4},
                     "layouts": {"qkv": "grouped", "fc1": "gate-up"}}}


def _wait_accepted(cluster: Cluster, namespace: str, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = json.loads(cluster.kubectl("get", "ckptconv", "from-the-image", "-o", "json",
                                          namespace=namespace).stdout)
        conditions = {c["type"]: c for c in body.get("status", {}).get("conditions", [])}
        if conditions.get("Accepted", {}).get("status") == "True":
            return body
        time.sleep(1)
    raise AssertionError(f"not Accepted after {timeout} s: {body.get('status')}")


def test_operator_container_reconciles_against_the_api_server(
        built_images: dict[str, Image], image_daemon: dict[str, str], k8s_cluster: Cluster,
        tmp_path: Path) -> None:
    k8s_cluster.apply_crd(CRD)
    namespace = k8s_cluster.create_namespace("image")
    for name in ("mindformers", "megatron"):
        k8s_cluster.apply(_pvc(name, namespace))
    kubeconfig = k8s_cluster.write_kubeconfig(k8s_cluster.token, tmp_path / "kubeconfig", namespace=namespace)
    kubeconfig.chmod(0o644)  # the container runs as uid 10001
    name = f"ms2mg-operator-test-{os.getpid()}"
    env = image_daemon
    _docker(env, "run", "-d", "--name", name, "--network=host", "--read-only", "--tmpfs", "/tmp",
            "--cap-drop=ALL", "--security-opt=no-new-privileges", "-v", f"{kubeconfig}:/kube/config:ro",
            "-e", "KUBECONFIG=/kube/config", "-e", f"MS2MG_WATCH_NAMESPACES={namespace}",
            "-e", "MS2MG_METRICS_PORT=0", "-e", "MS2MG_LIVENESS_PORT=0",
            "-e", "MS2MG_CONVERTER_IMAGE=localhost/ms2mg-converter:dev", built_images["operator"].name)
    try:
        k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(_conversion(namespace)), namespace=namespace)
        body = _wait_accepted(k8s_cluster, namespace)
        jobs = json.loads(k8s_cluster.kubectl("get", "jobs", "-o", "json", namespace=namespace).stdout)["items"]
        assert [j["metadata"]["name"] for j in jobs] == [body["status"]["jobName"]]
        job = jobs[0]
        assert job["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "localhost/ms2mg-converter:dev"
        assert container["command"] == ["ms2mg"] and container["args"][0] == "convert"
        assert _docker(env, "inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"
    finally:
        logs = _docker(env, "logs", name, check=False)
        _docker(env, "rm", "-f", name, check=False)
        k8s_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    assert "Traceback" not in logs.stdout + logs.stderr, logs.stdout + logs.stderr
