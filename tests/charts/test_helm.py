"""The chart with real helm binaries (3.17 and 4.1) and the test API server (docs/helm.md "How the tests exercise it").

Without a cluster: `helm lint --strict`; `helm template` of the default values and every documented variant,
validated against the Kubernetes schemas (kubernetes-validate, strict, 1.25 and its latest); the operator's RBAC is
exactly what docs/operator.md lists; the Deployment's security settings; the operator settings the Deployment sets
parse into what the values say; values that contradict each other fail with a clear message.

With the test API server (tests/k8s): `kubectl apply --dry-run=server` of every variant; then `helm install`;
the operator run as a local process with the chart's settings and the token of the chart's ServiceAccount (not
admin) converting the tiny sample end to end (the fake kubelet of tests/k8s/kubelet.py runs the Job's pod command
locally); `helm upgrade` (helm 4) to namespaced mode with a second operator run; `helm uninstall`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from ms2mg_operator.config import OperatorSettings
from tests.charts.conftest import (
    CHART,
    REPO,
    VARIANTS,
    Manifest,
    chart_values,
    find,
    one,
    render,
    run_helm,
    template_text,
    variant_values,
)
from tests.k8s.cluster import Cluster, KubectlError, wait_for
from tests.k8s.kubelet import FakeKubelet

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(600)]

ALL_VARIANTS = [None, *sorted(VARIANTS)]
VARIANT_IDS = ["default", *sorted(VARIANTS)]
CRD_NAME = "checkpointconversions.ms2mg.io"
#: kinds that kubernetes-validate has no schema for (third-party CRDs)
NO_SCHEMA = {"ServiceMonitor"}

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


# --- lint and template ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("major", [3, 4])
@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
def test_helm_lint_strict(variant: str | None, major: int, tmp_path: Path) -> None:
    args = [] if variant is None else ["-f", str(VARIANTS[variant])]
    out = run_helm("lint", "--strict", str(CHART), *args, major=major, tmp=tmp_path).stdout
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
def test_helm_3_and_4_render_the_same(variant: str | None) -> None:
    assert render(variant=variant, major=3) == render(variant=variant, major=4)


@pytest.mark.parametrize("k8s_version", ["1.25.0", kubernetes_validate.utils.latest_version()])
@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
def test_rendered_manifests_match_kubernetes_schemas(variant: str | None, k8s_version: str) -> None:
    manifests = render(variant=variant)
    assert manifests
    for manifest in manifests:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        try:
            kubernetes_validate.validate(manifest, k8s_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert manifest["kind"] in NO_SCHEMA, f"no Kubernetes schema for {name}"
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{name} is invalid for Kubernetes {k8s_version}: {path}: {exc.message}")


def test_every_manifest_is_labelled_and_namespaced_correctly() -> None:
    for variant in ALL_VARIANTS:
        for m in render(variant=variant):
            labels = m["metadata"]["labels"]
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["app.kubernetes.io/instance"] == "ms2mg"
            cluster_scoped = m["kind"] in {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
            assert ("namespace" in m["metadata"]) != cluster_scoped, m["kind"]


def test_documented_variants_render_what_they_say() -> None:
    names = {(m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"]) for m in render()}
    assert names == {
        ("CustomResourceDefinition", None, CRD_NAME),
        ("ServiceAccount", "ms2mg-system", "ms2mg"),
        ("ServiceAccount", "ms2mg-system", "ms2mg-converter"),
        ("ClusterRole", None, "ms2mg"),
        ("ClusterRoleBinding", None, "ms2mg"),
        ("ClusterRole", None, "ms2mg-view"),
        ("ClusterRole", None, "ms2mg-edit"),
        ("Service", "ms2mg-system", "ms2mg-metrics"),
        ("Deployment", "ms2mg-system", "ms2mg"),
    }
    byo = render(variant="bring-your-own")
    assert [m["kind"] for m in byo] == ["Deployment"]
    assert byo[0]["spec"]["template"]["spec"]["serviceAccountName"] == "ms2mg-operator"
    prod = render(variant="production")
    monitor = one(prod, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["interval"] == "1m"
    service = one(prod, "Service")
    assert all(monitor["spec"]["selector"]["matchLabels"][k] == v for k, v in service["metadata"]["labels"].items()
               if k in monitor["spec"]["selector"]["matchLabels"])
    assert {m["metadata"]["namespace"] for m in find(prod, "ServiceAccount", "ms2mg-operator-converter")} == {
        "ms2mg-system", "ml-research"}
    namespaced = render(variant="namespaced")
    assert "annotations" not in one(namespaced, "CustomResourceDefinition")["metadata"]  # crds.keep: false
    assert {m["metadata"]["namespace"] for m in find(namespaced, "ServiceAccount", "ms2mg-converter")} == {
        "ms2mg-system", "ml-team-a", "ml-team-b"}


# --- RBAC ----------------------------------------------------------------------------------------------------------
def documented_rules() -> tuple[set[Rule], set[Rule]]:
    """(application, framework) rules from the tables of docs/operator.md "RBAC: the verbs the code uses"."""
    section = (REPO / "docs" / "operator.md").read_text().split("## RBAC: the verbs the code uses", 1)[1]
    section = section.split("\n## ", 1)[0]
    tables: list[set[Rule]] = []
    current: set[Rule] | None = None
    for line in section.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("API group", "---"):
            if current is None:
                current = set()
                tables.append(current)
            continue
        assert current is not None
        group = re.findall(r"`([^`]*)`", cells[0])[0].strip('"')
        (resource,) = re.findall(r"`([^`]*)`", cells[1])
        for verb in re.findall(r"`([^`]*)`", cells[2]):
            current.add((group, resource, verb))
    assert len(tables) == 2, "expected the Application and Framework tables in docs/operator.md"
    return tables[0], tables[1]


APPLICATION, FRAMEWORK = documented_rules()
CRD_DISCOVERY = {r for r in FRAMEWORK if r[1] == "customresourcedefinitions"}
NAMESPACE_OBSERVATION = {r for r in FRAMEWORK if r[1] == "namespaces"}


def rule_set(rules: list[dict[str, Any]]) -> set[Rule]:
    out: set[Rule] = set()
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields (resourceNames?): {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    out.add((group, resource, verb))
    return out


def operator_grants(manifests: list[Manifest], sa: str, sa_namespace: str) -> dict[str | None, set[Rule]]:
    """Rules bound to the ServiceAccount, by namespace (None: cluster-wide)."""
    roles = {(m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"]): m
             for m in manifests if m["kind"] in ("Role", "ClusterRole")}
    grants: dict[str | None, set[Rule]] = {}
    for binding in find(manifests, "RoleBinding") + find(manifests, "ClusterRoleBinding"):
        subjects = binding.get("subjects") or []
        if {"kind": "ServiceAccount", "name": sa, "namespace": sa_namespace} not in subjects:
            continue
        ns = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        grants.setdefault(ns, set()).update(rule_set(role["rules"]))
    return grants


def test_docs_tables_parsed() -> None:
    assert len(APPLICATION) == 16 and ("batch", "jobs", "create") in APPLICATION
    assert ("", "pods", "get") not in APPLICATION
    assert CRD_DISCOVERY and NAMESPACE_OBSERVATION and CRD_DISCOVERY | NAMESPACE_OBSERVATION == FRAMEWORK


def test_rbac_all_namespaces_is_exactly_the_documented_set() -> None:
    grants = operator_grants(render(), "ms2mg", "ms2mg-system")
    # kopf observes namespaces only when it watches named ones: not needed cluster-wide
    assert grants == {None: APPLICATION | CRD_DISCOVERY}


def test_rbac_named_namespaces_is_exactly_the_documented_set() -> None:
    grants = operator_grants(render(variant="namespaced"), "ms2mg", "ms2mg-system")
    assert grants == {None: CRD_DISCOVERY | NAMESPACE_OBSERVATION, "ml-team-a": APPLICATION,
                      "ml-team-b": APPLICATION}


def test_converter_service_account_has_no_access() -> None:
    for variant in ALL_VARIANTS:
        manifests = render(variant=variant)
        for sa in find(manifests, "ServiceAccount"):
            if sa["metadata"]["labels"]["app.kubernetes.io/component"] == "converter":
                assert sa["automountServiceAccountToken"] is False
                assert operator_grants(manifests, sa["metadata"]["name"], sa["metadata"]["namespace"]) == {}


def test_user_roles_are_aggregated_and_bound_to_nobody() -> None:
    manifests = render()
    view, edit = one(manifests, "ClusterRole", "ms2mg-view"), one(manifests, "ClusterRole", "ms2mg-edit")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    bound = {b["roleRef"]["name"] for b in find(manifests, "ClusterRoleBinding") + find(manifests, "RoleBinding")}
    assert not bound & {"ms2mg-view", "ms2mg-edit"}
    assert find(render("--set", "rbac.aggregateToDefaultRoles=false"), "ClusterRole", "ms2mg-view") == []


def test_every_rbac_rule_has_a_comment() -> None:
    lines = (CHART / "templates" / "rbac.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("- apiGroups:"):
            assert lines[i - 1].lstrip().startswith("#"), f"rbac.yaml:{i + 1}: rule without a comment above it"


def test_rbac_create_false_renders_no_rbac() -> None:
    kinds = {m["kind"] for m in render("--set", "rbac.create=false")}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


# --- the Deployment ------------------------------------------------------------------------------------------------
def deployment_env(manifests: list[Manifest]) -> dict[str, str]:
    container = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    for key in [k for k in os.environ if k.startswith("MS2MG_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return OperatorSettings()


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
def test_deployment_shape_and_security(variant: str | None) -> None:
    manifests = render(variant=variant)
    deployment = one(manifests, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False
    assert "hostNetwork" not in pod and "hostPID" not in pod
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in sc
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # the only writable place
    assert container["resources"]["limits"]["memory"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = deployment_env(manifests)
    assert ports[probe["port"]] == int(env["MS2MG_LIVENESS_PORT"])
    if "metrics" in ports:
        assert ports["metrics"] == int(env["MS2MG_METRICS_PORT"])
    else:
        assert env["MS2MG_METRICS_PORT"] == "0"


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
def test_operator_settings_from_the_values(variant: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    values = variant_values(variant) if variant else chart_values()
    manifests = render(variant=variant)
    settings = settings_from(deployment_env(manifests), monkeypatch)
    converter_image = values["converterImage"]
    expected_image = (f"{converter_image['repository']}@{converter_image['digest']}" if converter_image["digest"]
                      else f"{converter_image['repository']}:{converter_image['tag'] or '0.1.0'}")
    assert settings.converter_image == expected_image
    assert settings.image_pull_policy == (converter_image["pullPolicy"] or None)
    assert settings.allowed_images == (values["allowedImages"] or [converter_image["repository"]])
    assert settings.allowed_service_accounts == values["allowedServiceAccounts"]
    assert not settings.service_account_allowed("default")  # no variant allows any ServiceAccount
    assert settings.watch_namespaces == values["watchNamespaces"]
    assert settings.all_namespaces == (not values["watchNamespaces"])
    assert settings.log_format == values["logFormat"]
    assert settings.default_backoff_limit == values["jobDefaults"]["backoffLimit"]
    assert settings.default_ttl_seconds_after_finished == values["jobDefaults"]["ttlSecondsAfterFinished"]
    assert settings.default_active_deadline_seconds == values["jobDefaults"].get("activeDeadlineSeconds")
    assert settings.default_resources == values["jobDefaults"]["resources"]
    assert settings.metrics_port == (values["metrics"]["port"] if values["metrics"]["enabled"] else 0)
    assert settings.liveness_port == values["liveness"]["port"]
    converter_sas = {m["metadata"]["name"] for m in find(manifests, "ServiceAccount")
                     if m["metadata"]["labels"]["app.kubernetes.io/component"] == "converter"}
    assert converter_sas <= {settings.converter_service_account}
    for extra in values["extraEnv"]:
        assert deployment_env(manifests)[extra["name"]] == extra["value"]


def test_operator_image_tag_digest_and_app_version() -> None:
    container = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ms2mg-operator:0.1.0"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == "0.1.0"
    prod = one(render(variant="production"), "Deployment")["spec"]["template"]["spec"]
    assert prod["containers"][0]["image"].startswith("registry.example.com/ml/ms2mg-operator@sha256:")
    assert prod["imagePullSecrets"] == [{"name": "regcred"}]
    assert prod["priorityClassName"] == "system-cluster-critical"


# --- values that contradict each other, and typos, fail in helm itself ----------------------------------------------
FAILING = [
    pytest.param(["--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"],
                 "metrics.serviceMonitor.enabled needs metrics.enabled", id="service-monitor-without-metrics"),
    pytest.param(["--set", "liveness.port=8080"], "metrics.port and liveness.port must differ", id="same-ports"),
    pytest.param(["--set", "extraEnv[0].name=MS2MG_CONVERTER_IMAGE", "--set", "extraEnv[0].value=x"],
                 "extraEnv: MS2MG_CONVERTER_IMAGE is set by the chart", id="extra-env-overrides-chart"),
    pytest.param(["--set", "serviceAccount.create=false"], "serviceAccount.name is required", id="sa-without-name"),
    pytest.param(["--set", "converterServiceAccount.create=false"], "converterServiceAccount.name is required",
                 id="converter-sa-without-name"),
    pytest.param(["--set", "image.repository="], "repository", id="empty-repository"),
    pytest.param(["--set", "imagee.tag=1"], "imagee", id="typo-top-level"),
    pytest.param(["--set", "crds.enable=false"], "enable", id="typo-crds"),
    pytest.param(["--set", "watchNamespaces[0]=Team_A"], "watchNamespaces", id="bad-namespace"),
    pytest.param(["--set", "logFormat=yaml"], "logFormat", id="bad-log-format"),
]


@pytest.mark.parametrize("major", [3, 4])
@pytest.mark.parametrize(("args", "message"), FAILING)
def test_bad_values_fail_with_a_clear_message(args: list[str], message: str, major: int) -> None:
    proc = run_helm("template", "ms2mg", str(CHART), *args, major=major, check=False)
    assert proc.returncode != 0, f"helm template {' '.join(args)} succeeded"
    assert message in proc.stderr, proc.stderr


# --- against the test API server ------------------------------------------------------------------------------------
def dry_run_variant(cluster: Cluster, variant: str | None, namespace: str) -> list[str]:
    """`kubectl apply --dry-run=server` of the rendered variant; namespaces in the values replaced by fresh ones."""
    args: list[str] = []
    values = variant_values(variant) if variant else {"watchNamespaces": [], "converterServiceAccount": {}}
    if values["watchNamespaces"]:
        watched = [cluster.create_namespace("watched") for _ in values["watchNamespaces"]]
        args += ["--set", "watchNamespaces={" + ",".join(watched) + "}"]
    if values["converterServiceAccount"].get("extraNamespaces"):
        args += ["--set", f"converterServiceAccount.extraNamespaces={{{cluster.create_namespace('extra')}}}"]
    manifests = [m for m in yaml.safe_load_all(template_text(*args, variant=variant, namespace=namespace)) if m]
    applied = [m for m in manifests if m["kind"] not in NO_SCHEMA]  # no ServiceMonitor CRD on the test server
    out = cluster.kubectl("apply", "--dry-run=server", "--validate=false", "-f", "-",
                          input=yaml.safe_dump_all(applied)).stdout
    return out.splitlines()


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
def test_server_side_dry_run(k8s_cluster: Cluster, k8s_namespace: str, variant: str | None) -> None:
    lines = dry_run_variant(k8s_cluster, variant, k8s_namespace)
    assert lines and all("(server dry run)" in line for line in lines), lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status), response.read().decode()


@dataclass
class Release:
    cluster: Cluster
    name: str
    namespace: str  # the release namespace
    workload: str  # where CheckpointConversions are created
    other: str  # a namespace the namespaced-mode operator must ignore
    install_output: str
    without_flag: subprocess.CompletedProcess[str]  # `helm install` without --disable-openapi-validation
    uninstalled: bool = False

    def manifests(self) -> list[Manifest]:
        text = self.cluster.helm("get", "manifest", self.name, "-n", self.namespace).stdout
        return [m for m in yaml.safe_load_all(text) if m]

    def can_i(self, kubeconfig: Path, *args: str) -> bool:
        proc = self.cluster.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
        return proc.stdout.strip() == "yes"


class OperatorProcess:
    """`python -m ms2mg_operator` with the environment the chart's Deployment sets and a given kubeconfig."""

    def __init__(self, env: dict[str, str], kubeconfig: Path, log: Path) -> None:
        self.metrics_port, self.liveness_port = free_port(), free_port()
        full = {k: v for k, v in os.environ.items() if not k.startswith(("MS2MG_", "KUBERNETES_"))}
        full.update(env)
        full.update(KUBECONFIG=str(kubeconfig), MS2MG_LIVENESS_PORT=str(self.liveness_port))
        if env.get("MS2MG_METRICS_PORT", "0") != "0":
            full["MS2MG_METRICS_PORT"] = str(self.metrics_port)
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ms2mg_operator"], env=full, stdout=self._file,
                                     stderr=subprocess.STDOUT, cwd=str(REPO))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._file.close()
        return self.log.read_text(errors="replace")

    def __enter__(self) -> OperatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: where the tiny sample (ms2mg_converter.demo.sample, 4 layers, GQA 8/4, SwiGLU) lies on the source volume, and what
#: `ms2mg convert` cannot infer from its tensors
SAMPLE_PATH = "models/llama-tiny"
SAMPLE_SPEC = {"model": {"numAttentionHeads": 8, "numQueryGroups": 4}, "layouts": {"qkv": "grouped", "fc1": "gate-up"}}


def conversion(name: str, namespace: str, destination: str, *, tensor: int = 1, pipeline: int = 1,
               sample: bool = False) -> Manifest:
    spec: Manifest = {"source": {"pvc": "mindformers", "path": SAMPLE_PATH if sample else "llama2-7b"},
                      "destination": {"pvc": "megatron", "path": destination},
                      "parallelism": {"tensor": tensor, "pipeline": pipeline}}
    if sample:
        spec.update(SAMPLE_SPEC)
    return {"apiVersion": "ms2mg.io/v1alpha1", "kind": "CheckpointConversion",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def pvcs(namespace: str) -> list[Manifest]:
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": n, "namespace": namespace},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
            for n in ("mindformers", "megatron")]


def condition(cluster: Cluster, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
    body = cluster.kubectl_json("get", "checkpointconversion", name, namespace=namespace)
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def wait_accepted(cluster: Cluster, namespace: str, name: str, operator: OperatorProcess) -> dict[str, Any]:
    def accepted() -> dict[str, Any] | None:
        if operator.proc.poll() is not None:
            raise AssertionError(f"the operator exited ({operator.proc.returncode}):\n{operator.log.read_text()}")
        cond = condition(cluster, namespace, name, "Accepted")
        return cond if cond and cond["status"] == "True" else None

    try:
        return wait_for(accepted, timeout=90, interval=0.5, what=f"{namespace}/{name} Accepted")
    except Exception as exc:
        raise AssertionError(f"{exc}\n--- operator log ---\n{operator.log.read_text()[-6000:]}") from exc


def jobs_of(cluster: Cluster, namespace: str, name: str) -> list[Manifest]:
    items = cluster.kubectl_json("get", "jobs", "-l", f"ms2mg.io/conversion={name}", namespace=namespace)["items"]
    return list(items)


def operator_env(release: Release) -> dict[str, str]:
    return deployment_env(release.manifests())


@pytest.fixture(scope="module")
def release(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart installed (helm 3, all namespaces) into the test API server; CRs and CRD removed afterwards."""
    cluster = k8s_cluster
    system = cluster.create_namespace("ms2mg-system")
    workload, other = cluster.create_namespace("ml"), cluster.create_namespace("other")
    cluster.route_api_group("ms2mg.io", "v1alpha1")  # before the CRD exists (docs/k8s-testing.md)
    # helm validates against the front server's (1.20) OpenAPI, which does not know x-kubernetes-validations: without
    # --disable-openapi-validation the install fails (real clusters >= 1.25 need no flag: docs/helm.md)
    refused = cluster.helm("install", "ms2mg", str(CHART), "-n", system, "--dry-run=server", check=False)
    t0 = time.monotonic()
    out = cluster.helm("install", "ms2mg", str(CHART), "-n", system, "--disable-openapi-validation",
                       "--set", f"converterServiceAccount.extraNamespaces={{{workload}}}").stdout
    cluster.wait_crds_served(CRD_NAME)
    print(f"\n[charts] helm install + CRD served: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    rel = Release(cluster, "ms2mg", system, workload, other, out, refused)
    try:
        yield rel
    finally:
        if not rel.uninstalled:
            cluster.helm("uninstall", "ms2mg", "-n", system, check=False)
        if cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0:
            for ns in (workload, other):  # no operator runs now: drop kopf's finalizer so deletion can finish
                for item in cluster.kubectl_json("get", "checkpointconversions", namespace=ns)["items"]:
                    cluster.kubectl("patch", "checkpointconversion", item["metadata"]["name"], "--type=merge",
                                    "-p", '{"metadata":{"finalizers":null}}', namespace=ns)
            cluster.delete_crd(CRD_NAME)
        for ns in (system, workload, other):
            cluster.delete_namespace(ns)


def test_install_needs_disable_openapi_validation_on_this_server(release: Release) -> None:
    assert release.without_flag.returncode != 0
    assert 'unknown field "x-kubernetes-validations"' in release.without_flag.stderr, release.without_flag.stderr


def test_install_created_the_resources(release: Release) -> None:
    cluster, system = release.cluster, release.namespace
    assert "ms2mg 0.1.0 has been deployed successfully" in release.install_output  # NOTES.txt
    assert "kubectl apply -f examples/conversion.yaml" in release.install_output
    assert f"kubectl -n {system} rollout status deployment/ms2mg" in release.install_output
    status = json.loads(cluster.helm("status", "ms2mg", "-n", system, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    deployment = cluster.kubectl_json("get", "deployment", "ms2mg", namespace=system)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    crd = cluster.kubectl_json("get", "crd", CRD_NAME)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    for ns in (system, release.workload):
        sa = cluster.kubectl_json("get", "serviceaccount", "ms2mg-converter", namespace=ns)
        assert sa["automountServiceAccountToken"] is False
    # the CRD's CEL rules are live (served by the 1.36 CRD server)
    bad = conversion("bad", release.workload, "../escape")
    proc = cluster.kubectl("create", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0 and "destination" in proc.stderr, proc.stderr


def test_service_account_permissions(release: Release) -> None:
    cluster, ns = release.cluster, release.workload
    operator = cluster.sa_kubeconfig(release.namespace, "ms2mg", create=False)
    allowed = [("create", "jobs.batch"), ("delete", "jobs.batch"), ("list", "pods"),
               ("get", "pods", "--subresource=log"), ("get", "persistentvolumeclaims"), ("create", "events"),
               ("patch", "checkpointconversions.ms2mg.io"),
               ("patch", "checkpointconversions.ms2mg.io", "--subresource=status")]
    denied = [("get", "pods"), ("get", "secrets"), ("create", "configmaps"), ("create", "pods"),
              ("update", "checkpointconversions.ms2mg.io"), ("delete", "checkpointconversions.ms2mg.io"),
              ("create", "checkpointconversions.ms2mg.io"), ("patch", "jobs.batch"), ("list", "namespaces"),
              ("create", "customresourcedefinitions.apiextensions.k8s.io")]
    for args in allowed:
        assert release.can_i(operator, *args, "-n", ns), f"operator cannot {args}"
    assert release.can_i(operator, "list", "jobs.batch", "--all-namespaces")
    for args in denied:
        assert not release.can_i(operator, *args, "-n", ns), f"operator may {args}"
    for verb, resource in [("get", "pods"), ("list", "secrets"), ("create", "jobs.batch"), ("get", "configmaps"),
                           ("list", "checkpointconversions.ms2mg.io")]:
        as_converter = f"--as=system:serviceaccount:{ns}:ms2mg-converter"
        assert cluster.kubectl("auth", "can-i", verb, resource, "-n", ns, as_converter,
                               check=False).stdout.strip() == "no"


def test_operator_with_the_chart_rbac_converts_end_to_end(release: Release, tmp_path: Path) -> None:
    """The operator, with the chart's env and its ServiceAccount's token, runs a conversion of the tiny sample to
    Succeeded; the fake kubelet (tests/k8s/kubelet.py) runs the Job's pod command locally on directory volumes."""
    from ms2mg_converter.demo.sample import SampleSpec, build_sample

    cluster, ns = release.cluster, release.workload
    source, destination = tmp_path / "source-volume", tmp_path / "destination-volume"
    build_sample(SampleSpec(), source / SAMPLE_PATH)
    destination.mkdir()
    env = operator_env(release)
    kubeconfig = cluster.sa_kubeconfig(release.namespace, "ms2mg", create=False)  # the chart's SA, not admin
    cluster.apply(pvcs(ns))
    kubelet = FakeKubelet(cluster, namespace=ns, workdir=tmp_path / "kubelet",
                          volumes={"mindformers": source, "megatron": destination})
    with kubelet, OperatorProcess(env, kubeconfig, tmp_path / "operator.log") as operator:
        t0 = time.monotonic()
        cluster.apply(conversion("llama", ns, "llama/tp2-pp2", tensor=2, pipeline=2, sample=True))
        accepted = wait_accepted(cluster, ns, "llama", operator)
        t_accepted = time.monotonic() - t0
        assert accepted["reason"] in ("JobCreated", "JobAdopted")
        (job,) = jobs_of(cluster, ns, "llama")
        pod = job["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "ms2mg-converter"
        assert pod["automountServiceAccountToken"] is False
        assert pod["containers"][0]["image"] == "ms2mg-converter:0.1.0"
        assert pod["containers"][0]["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"},
                                                     "limits": {"memory": "16Gi"}}
        assert job["spec"]["backoffLimit"] == 2
        assert job["spec"]["ttlSecondsAfterFinished"] == 86400
        try:
            cluster.kubectl("wait", "--for=condition=Succeeded", "ckptconv/llama", "--timeout=180s", namespace=ns,
                            timeout=190)
        except KubectlError as exc:
            body = cluster.kubectl_json("get", "checkpointconversion", "llama", namespace=ns)
            runs = "\n".join(r.log_text()[-3000:] for r in kubelet.runs.values())
            raise AssertionError(
                f"{exc}\nstatus: {json.dumps(body.get('status'), indent=1)}\nkubelet errors: {kubelet.errors}\n"
                f"converter: {runs}\noperator: {operator.log.read_text()[-4000:]}") from None
        elapsed = time.monotonic() - t0
        body = cluster.kubectl_json("get", "checkpointconversion", "llama", namespace=ns)
        assert body["status"]["jobName"] == job["metadata"]["name"]
        assert body["status"]["result"]["verified"] is True
        assert kubelet.errors == [] and len(kubelet.runs) == 1
        written = sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file())
        assert "llama/tp2-pp2/iter_0000001/mp_rank_01_001/model_optim_rng.pt" in written
        assert "llama/tp2-pp2/latest_checkpointed_iteration.txt" in written
        status, text = fetch(f"http://127.0.0.1:{operator.metrics_port}/metrics")
        assert status == 200 and "ms2mg_jobs_created_total 1.0" in text
        assert 'ms2mg_conversions_total{reason="Converted",result="succeeded"} 1.0' in text
        assert fetch(f"http://127.0.0.1:{operator.liveness_port}/healthz")[0] == 200  # the liveness probe's URL
        print(f"\n[charts] operator (chart SA token): Accepted after {t_accepted:.1f}s, Succeeded after "
              f"{elapsed:.1f}s", file=sys.stderr)
    log = operator.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-6000:]
    assert "Forbidden" not in log and "Not enough permissions" not in log, log[-6000:]


def test_upgrade_to_namespaced_mode_then_uninstall(release: Release, tmp_path: Path) -> None:
    cluster, system, ns, other = release.cluster, release.namespace, release.workload, release.other
    # helm 4 upgrades the release helm 3 installed: watch one namespace only, JSON logs, no retries
    cluster.helm("upgrade", "ms2mg", str(CHART), "-n", system, "--disable-openapi-validation",
                 "--set", f"watchNamespaces={{{ns}}}", "--set", "logFormat=json",
                 "--set", "jobDefaults.backoffLimit=0", major=4)
    manifests = release.manifests()
    assert operator_grants(manifests, "ms2mg", system) == {None: CRD_DISCOVERY | NAMESPACE_OBSERVATION,
                                                           ns: APPLICATION}
    assert cluster.kubectl("get", "clusterrole", "ms2mg", check=False).returncode != 0  # replaced by a Role
    assert cluster.kubectl_json("get", "role", "ms2mg", namespace=ns)["rules"]
    env = operator_env(release)
    assert env["MS2MG_WATCH_NAMESPACES"] == ns and env["MS2MG_LOG_FORMAT"] == "json"
    kubeconfig = cluster.sa_kubeconfig(system, "ms2mg", create=False)
    assert not release.can_i(kubeconfig, "list", "jobs.batch", "-n", other)
    assert not release.can_i(kubeconfig, "list", "jobs.batch", "--all-namespaces")

    cluster.apply(pvcs(other))
    jobs_before = {j["metadata"]["name"] for j in jobs_of(cluster, ns, "llama")}
    with OperatorProcess(env, kubeconfig, tmp_path / "operator.log") as operator:
        cluster.apply(conversion("mistral", ns, "mistral/tp1-pp1"))
        cluster.apply(conversion("ignored", other, "x"))
        wait_accepted(cluster, ns, "mistral", operator)
        (job,) = jobs_of(cluster, ns, "mistral")
        assert job["spec"]["backoffLimit"] == 0
        time.sleep(2)
        ignored = cluster.kubectl_json("get", "checkpointconversion", "ignored", namespace=other)
        assert "status" not in ignored and jobs_of(cluster, other, "ignored") == []
        assert {j["metadata"]["name"] for j in jobs_of(cluster, ns, "llama")} == jobs_before  # resumed, not redone
    log = operator.log.read_text(errors="replace")
    assert "Traceback" not in log and "Forbidden" not in log, log[-6000:]
    assert log.lstrip().startswith("{"), log[:500]  # logFormat=json

    out = cluster.helm("uninstall", "ms2mg", "-n", system, major=4).stdout
    release.uninstalled = True
    assert "uninstalled" in out
    # the CRD (helm.sh/resource-policy: keep) and with it the conversions stay; everything else is gone
    assert cluster.kubectl_json("get", "crd", CRD_NAME)
    assert cluster.kubectl_json("get", "checkpointconversion", "llama", namespace=ns)
    for kind, name, namespace in [("deployment", "ms2mg", system), ("serviceaccount", "ms2mg", system),
                                  ("serviceaccount", "ms2mg-converter", ns), ("role", "ms2mg", ns),
                                  ("clusterrole", "ms2mg-cluster", None), ("service", "ms2mg-metrics", system)]:
        args = ["get", kind, name] + (["-n", namespace] if namespace else [])
        assert cluster.kubectl(*args, check=False).returncode != 0, f"{kind}/{name} survived helm uninstall"
    with pytest.raises(KubectlError):
        cluster.helm("status", "ms2mg", "-n", system)
