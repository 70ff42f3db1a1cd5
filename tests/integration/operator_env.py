"""Helpers of the operator integration tests (tests/integration/test_operator*.py).

* the CRD (``crds/checkpointconversions.ms2mg.io.yaml``) installed once per session, kube-controller-manager restarted
  so that its garbage collector knows the kind at once;
* a tiny MindFormers sample (``ms2mg_converter.demo.sample``) on a "source volume" directory and the spec values
  it needs;
* :class:`OperatorProcess`: ``python -m ms2mg_operator`` as a separate process (its env settings, a kubeconfig, a log
  file), started/stopped/SIGKILLed by the test, with its peak RSS (``VmHWM``);
* the operator's RBAC: the Helm chart's (``charts/ms2mg``, rendered with ``helm template``) when the chart has RBAC
  templates, else the verbs listed in docs/operator.md ("RBAC: the verbs the code uses"); the operator runs with a
  ServiceAccount token bound to exactly these rules, never as admin;
* waiting on CheckpointConversions and reading their conditions, Jobs, pods and Events.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.cluster import REPO_ROOT, Cluster, ControlPlaneError, wait_for
from tests.k8s.kubelet import FakeKubelet

Obj = dict[str, Any]
CRD_FILE = REPO_ROOT / "crds" / "checkpointconversions.ms2mg.io.yaml"
CHART_DIR = REPO_ROOT / "charts" / "ms2mg"
OPERATOR_DOC = REPO_ROOT / "docs" / "operator.md"
GROUP_VERSION = "ms2mg.io/v1alpha1"
OPERATOR_SA = "ms2mg-operator"
SOURCE_PVC, DEST_PVC = "mindformers", "megatron"
SAMPLE_PATH = "models/llama-tiny"
"""Where the sample lies on the source volume."""
SAMPLE_MODEL = {"numAttentionHeads": 8, "numQueryGroups": 4}
"""What `ms2mg convert` cannot read from the sample's tensors (heads/groups); the rest is inferred."""
SAMPLE_LAYOUTS = {"qkv": "grouped", "fc1": "gate-up"}
SAMPLE_GROUPS = 12
"""Tensor groups (progress total) of the sample conversion."""


# --- session fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ms2mg_crd(k8s_cluster: Cluster) -> str:
    """The generated CRD, served by the 1.36 server; KCM restarted so that GC of Jobs owned by CRs is immediate."""
    (name,) = k8s_cluster.apply_crd(CRD_FILE)
    k8s_cluster.restart_controller_manager()
    return name


@pytest.fixture(scope="session")
def sample_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source-volume directory holding the tiny sample at SAMPLE_PATH (4 layers, hidden 64, GQA 8/4, SwiGLU)."""
    from ms2mg_converter.demo.sample import SampleSpec, build_sample

    root = tmp_path_factory.mktemp("source-volume")
    build_sample(SampleSpec(), root / SAMPLE_PATH)
    return root


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print measured figures (``[reliability] ...``) even without ``-s``; also append them to
    ``$MS2MG_RELIABILITY_LOG`` if set."""

    def emit(line: str) -> None:
        with capsys.disabled():
            print(f"\n[reliability] {line}", flush=True)
        if os.environ.get("MS2MG_RELIABILITY_LOG"):
            with open(os.environ["MS2MG_RELIABILITY_LOG"], "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    return emit


# --- resources ----------------------------------------------------------------------------------------------------
def conversion(name: str, *, source_path: str = SAMPLE_PATH, destination: str | None = None, tensor: int = 2,
               pipeline: int = 2, source_pvc: str = SOURCE_PVC, destination_pvc: str = DEST_PVC,
               model: Obj | None = None, **spec: Any) -> Obj:
    """A CheckpointConversion of the sample (TP2/PP2 by default) to ``destination`` (default: ``out/<name>``)."""
    body: Obj = {
        "apiVersion": GROUP_VERSION, "kind": "CheckpointConversion", "metadata": {"name": name},
        "spec": {"source": {"pvc": source_pvc, "path": source_path},
                 "destination": {"pvc": destination_pvc, "path": destination or f"out/{name}"},
                 "parallelism": {"tensor": tensor, "pipeline": pipeline},
                 "model": {**SAMPLE_MODEL, **(model or {})}, "layouts": dict(SAMPLE_LAYOUTS)}}
    body["spec"].update(spec)
    return body


def create_pvcs(cluster: Cluster, namespace: str, *names: str) -> None:
    """PersistentVolumeClaim objects (they stay Pending: no provisioner; the fake kubelet maps them to dirs)."""
    cluster.apply([{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": n},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
                   for n in names], namespace=namespace)


def conversions_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/{GROUP_VERSION}/namespaces/{namespace}/checkpointconversions"
    return f"{path}/{name}" if name else path


def get_conversion(cluster: Cluster, namespace: str, name: str) -> Obj | None:
    try:
        return dict(cluster.get_raw(conversions_path(namespace, name)))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def condition(body: Obj | None, kind: str) -> Obj | None:
    for cond in (body or {}).get("status", {}).get("conditions", []):
        if cond.get("type") == kind:
            return dict(cond)
    return None


def has(kind: str, status: str = "True", reason: str | None = None,
        generation: int | None = None) -> Callable[[Obj], bool]:
    def check(body: Obj) -> bool:
        cond = condition(body, kind)
        return (cond is not None and cond["status"] == status and (reason is None or cond["reason"] == reason)
                and (generation is None or cond.get("observedGeneration") == generation))
    return check


SUMMARY_TYPES = ("Ready", "Reconciling", "Stalled")


def summary(body: Obj | None) -> list[tuple[str, str, str]]:
    """The stage conditions, in order (the summary conditions in front of them: see `ready`, `phase`)."""
    return [(c["type"], c["status"], c["reason"]) for c in (body or {}).get("status", {}).get("conditions", [])
            if c["type"] not in SUMMARY_TYPES]


def phase(body: Obj | None) -> str | None:
    return (body or {}).get("status", {}).get("phase")


def ready(body: Obj | None) -> tuple[str, str] | None:
    """(status, reason) of the Ready condition."""
    cond = condition(body, "Ready")
    return None if cond is None else (cond["status"], cond["reason"])


def wait_conversion(cluster: Cluster, namespace: str, name: str, predicate: Callable[[Obj], bool], *,
                    timeout: float = 60.0, what: str = "", operator: OperatorProcess | None = None) -> Obj:
    """Poll the resource until ``predicate(body)``; on timeout fail with its last status (and the operator log)."""
    last: list[Obj | None] = [None]

    def probe() -> Obj | None:
        body = get_conversion(cluster, namespace, name)
        last[0] = body
        return body if body is not None and predicate(body) else None

    try:
        return wait_for(probe, timeout=timeout, interval=0.2, what=what or f"{namespace}/{name}")
    except ControlPlaneError as exc:
        status = json.dumps((last[0] or {}).get("status"), indent=1)
        tail = operator.log_tail() if operator is not None else ""
        raise AssertionError(f"{exc}\nlast status of {name}: {status}\n{tail}") from None


def list_items(cluster: Cluster, path: str) -> list[Obj]:
    return list(cluster.get_raw(path).get("items", []))


def jobs(cluster: Cluster, namespace: str) -> list[Obj]:
    return list_items(cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs")


def pods(cluster: Cluster, namespace: str) -> list[Obj]:
    return list_items(cluster, f"/api/v1/namespaces/{namespace}/pods")


def events_for(cluster: Cluster, namespace: str, name: str) -> list[Obj]:
    items = list_items(cluster, f"/api/v1/namespaces/{namespace}/events")
    return [e for e in items if e.get("involvedObject", {}).get("name") == name
            and e.get("involvedObject", {}).get("kind") == "CheckpointConversion"]


def tree(root: Path) -> list[str]:
    """Relative paths of the files below ``root`` (sorted)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def megatron_files(tp: int, pp: int) -> list[str]:
    ranks = [f"iter_0000001/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt" if pp > 1
             else f"iter_0000001/mp_rank_{t:02d}/model_optim_rng.pt" for t in range(tp) for p in range(pp)]
    return sorted([*ranks, "latest_checkpointed_iteration.txt", "ms2mg-manifest.json"])


# --- RBAC -----------------------------------------------------------------------------------------------------------
RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


@dataclass(frozen=True)
class Rbac:
    """The operator's ServiceAccount and RBAC objects, and the rules they grant it."""

    objects: list[Obj]
    """ServiceAccount, Roles, ClusterRoles and their bindings, ready to apply."""
    service_account: str
    namespaced: list[Obj]
    """Rules bound in the watched namespace (Role/ClusterRole + RoleBinding)."""
    cluster: list[Obj]
    """Rules bound cluster-wide (ClusterRole + ClusterRoleBinding)."""
    source: str
    """Where the rules come from: the chart (``helm template``) or docs/operator.md."""

    @property
    def cluster_scoped(self) -> list[tuple[str, str]]:
        return [(o["kind"], o["metadata"]["name"]) for o in self.objects
                if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def _doc_rules(text: str, heading: str) -> list[Obj]:
    """Rules of the first markdown table after ``heading`` (columns: API group | resource | verbs | why)."""
    rules: list[Obj] = []
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("#") or (rules and not line.strip()):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        group = cells[0].strip("`").replace('""', "")
        rules.append({"apiGroups": [group], "resources": [cells[1].strip("`")],
                      "verbs": re.findall(r"`([a-z]+)`", cells[2])})
    return rules


def _bound_rules(objects: list[Obj], sa: str, namespace: str) -> tuple[list[Obj], list[Obj]]:
    """(namespaced, cluster-wide) rules that ``objects`` grant to ServiceAccount ``namespace/sa``."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): list(o.get("rules") or [])
             for o in objects if o["kind"] in ("Role", "ClusterRole")}
    namespaced: list[Obj] = []
    cluster_rules: list[Obj] = []
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == namespace
                   for s in binding.get("subjects") or []):
            continue
        ref = binding["roleRef"]
        role_ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        rules = roles.get((ref["kind"], role_ns, ref["name"]), [])
        (namespaced if binding["kind"] == "RoleBinding" else cluster_rules).extend(rules)
    return namespaced, cluster_rules


def chart_rbac(cluster: Cluster, namespace: str) -> Rbac | None:
    """The operator's ServiceAccount and RBAC from the Helm chart ``charts/ms2mg`` rendered with
    ``helm template`` for a release in ``namespace`` watching only ``namespace`` (``watchNamespaces``); None when
    there is no chart (yet) or it renders no Role."""
    if not (CHART_DIR / "Chart.yaml").is_file():
        return None
    release = "r" + hashlib.sha256(namespace.encode()).hexdigest()[:6]
    out = cluster.helm("template", release, str(CHART_DIR), "--namespace", namespace,
                       "--set", f"watchNamespaces={{{namespace}}}", "--set", "rbac.aggregateToDefaultRoles=false",
                       "--set", "crds.enabled=false").stdout
    docs = [d for d in yaml.safe_load_all(out) if isinstance(d, dict) and d.get("kind")]
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    subjects = {(s["name"], s.get("namespace")) for d in rbac if d["kind"].endswith("Binding")
                for s in d.get("subjects") or [] if s.get("kind") == "ServiceAccount"}
    if not rbac or len(subjects) != 1:
        return None
    ((sa, sa_ns),) = subjects
    assert sa_ns == namespace, f"the chart binds {sa_ns}/{sa}, expected the release namespace {namespace}"
    accounts = [d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa]
    objects = accounts or [{"apiVersion": "v1", "kind": "ServiceAccount",
                            "metadata": {"name": sa, "namespace": namespace}}]
    namespaced, cluster_rules = _bound_rules(rbac, sa, namespace)
    return Rbac(objects=[*objects, *rbac], service_account=sa, namespaced=namespaced, cluster=cluster_rules,
                source=f"helm template {CHART_DIR.relative_to(REPO_ROOT)} --set watchNamespaces={{{namespace}}}")


def documented_rbac(namespace: str, sa: str = OPERATOR_SA) -> Rbac:
    """The rules listed in docs/operator.md ("Application" in a Role, "Framework" in a ClusterRole)."""
    text = OPERATOR_DOC.read_text(encoding="utf-8")
    section = text[text.index("## RBAC: the verbs the code uses"):]
    namespaced, cluster_rules = _doc_rules(section, "Application"), _doc_rules(section, "Framework")
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]
    cluster_name = f"{sa}-{namespace}"
    objects: list[Obj] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": sa, "namespace": namespace}, "rules": namespaced},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": sa, "namespace": namespace}, "subjects": subject,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": cluster_name}, "rules": cluster_rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": cluster_name}, "subjects": subject,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name}},
    ]
    return Rbac(objects=objects, service_account=sa, namespaced=namespaced, cluster=cluster_rules,
                source="docs/operator.md")


def operator_rbac(cluster: Cluster, namespace: str) -> Rbac:
    """The chart's RBAC when the chart exists, else the documented one."""
    return chart_rbac(cluster, namespace) or documented_rbac(namespace)


@contextlib.contextmanager
def operator_identity(cluster: Cluster, namespace: str, rbac: Rbac | None = None) -> Iterator[tuple[Path, Rbac]]:
    """Apply ``rbac`` (default :func:`operator_rbac`); yield a kubeconfig acting as its ServiceAccount (a bound
    token, not admin) and the Rbac. Cluster-scoped objects are deleted afterwards."""
    rbac = rbac or operator_rbac(cluster, namespace)
    cluster.apply(rbac.objects)
    try:
        yield cluster.sa_kubeconfig(namespace, rbac.service_account, duration="2h", create=False), rbac
    finally:
        for kind, name in rbac.cluster_scoped:
            cluster.kubectl("delete", kind.lower(), name, "--ignore-not-found", "--wait=false", check=False)


STAGES = ("ResponseStarted", "ResponseComplete")


def audit_events(cluster: Cluster, user: str, since: float = 0.0) -> list[Obj]:
    """The completed requests of ``user`` (e.g. ``system:serviceaccount:NS:NAME``) at or after ``since`` (epoch
    seconds), from the API server's audit log (start-control-plane.sh logs ServiceAccounts' requests at Metadata
    level). Requests to aggregated APIs (the CRD server) are logged too, by the 1.20 front server. A long-running
    request (watch) appears once, with the stage it reached first (ResponseStarted: its code is 200)."""
    path = Path(cluster.env.get("AUDIT_LOG") or cluster.workdir / "audit.log")
    events: list[Obj] = []
    started: set[str | None] = set()
    if not path.exists():
        return events
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("user", {}).get("username") != user or event.get("stage") not in STAGES:
            continue
        if since and _epoch(event.get("requestReceivedTimestamp", "")) < since:
            continue
        if event["stage"] == "ResponseStarted" or event.get("auditID") not in started:
            events.append(event)  # a watch: logged when its response starts, again when (if) it ends
        started.add(event.get("auditID"))
    return events


def audit_verbs(cluster: Cluster, user: str, since: float = 0.0) -> dict[tuple[str, str, str], set[int]]:
    """(apiGroup, resource[/subresource], verb) -> response codes of the resource requests ``user`` made."""
    used: dict[tuple[str, str, str], set[int]] = {}
    for event in audit_events(cluster, user, since):
        ref = event.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # discovery (/api, /apis, /version)
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        key = (ref.get("apiGroup", ""), resource, str(event.get("verb")))
        used.setdefault(key, set()).add(int(event.get("responseStatus", {}).get("code", 0)))
    return used


def sa_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def _epoch(stamp: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def granted(rules: list[Obj]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", [""]) for r in rule.get("resources", [])
            for v in rule.get("verbs", [])}


# --- the operator process -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OperatorProcess:
    """``python -m ms2mg_operator`` (= ``ms2mg-operator``) watching ``namespaces`` with ``kubeconfig``."""

    kubeconfig: Path
    namespaces: list[str]
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    peak_rss_kib: int = 0
    """Largest VmHWM seen (kB) over this object's processes (sampled on stop/kill and by :meth:`sample_rss`)."""
    _log_paths: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, *, wait_ready: bool = True) -> OperatorProcess:
        assert self.proc is None or self.proc.poll() is not None, "the operator is already running"
        self.starts += 1
        liveness = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MS2MG_")}
        env.update({
            "KUBECONFIG": str(self.kubeconfig),
            "MS2MG_WATCH_NAMESPACES": ",".join(self.namespaces),
            "MS2MG_CONVERTER_IMAGE": "ms2mg-converter:integration-test",
            "MS2MG_METRICS_PORT": "0",
            "MS2MG_LIVENESS_PORT": str(liveness),
            "MS2MG_RECHECK_SECONDS": "2",
            "MS2MG_API_TIMEOUT_SECONDS": "15",
            "PYTHONUNBUFFERED": "1",
            **self.env,
        })
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"operator-{self.starts}.log"
        self._log_paths.append(log_path)
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ms2mg_operator"], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.log_dir,
                                         start_new_session=True)
        if wait_ready:
            self._wait_ready(liveness)
        return self

    def _wait_ready(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"the operator exited at start-up\n{self.log_tail()}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"the operator did not become live within {timeout:.0f}s\n{self.log_tail()}")

    def sample_rss(self) -> int:
        """Record and return the current process's VmHWM (peak RSS, kB)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.peak_rss_kib
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        return self.peak_rss_kib

    def kill(self) -> None:
        """SIGKILL (a crash: no clean-up handlers run)."""
        if self.proc is not None and self.proc.poll() is None:
            self.sample_rss()
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (kopf's graceful stop), SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.sample_rss()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self._log_paths if p.exists())

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().splitlines()[-lines:]
        return "--- operator log (tail) ---\n" + "\n".join(text)


@dataclass
class Env:
    """Everything one operator test uses: cluster, namespace, volumes, fake kubelet, operator process."""

    cluster: Cluster
    namespace: str
    source: Path
    destination: Path
    kubelet: FakeKubelet
    operator: OperatorProcess
    kubeconfig: Path
    rbac: Rbac

    @property
    def operator_user(self) -> str:
        """The operator's user name in the API server's audit log."""
        return sa_user(self.namespace, self.rbac.service_account)

    def apply(self, *bodies: Obj) -> None:
        """``kubectl apply`` of the resources; one request per resource, so the timeout grows with their number (a
        loaded shared machine made 50 take over a minute)."""
        self.cluster.apply(list(bodies), namespace=self.namespace, timeout=60.0 + 5.0 * len(bodies))

    def conversions(self) -> list[Obj]:
        return list_items(self.cluster, conversions_path(self.namespace))

    def get(self, name: str) -> Obj | None:
        return get_conversion(self.cluster, self.namespace, name)

    def must_get(self, name: str) -> Obj:
        body = self.get(name)
        assert body is not None, f"CheckpointConversion {self.namespace}/{name} is gone"
        return body

    def wait(self, name: str, predicate: Callable[[Obj], bool], *, timeout: float = 60.0, what: str = "") -> Obj:
        return wait_conversion(self.cluster, self.namespace, name, predicate, timeout=timeout, what=what,
                               operator=self.operator)

    def jobs(self) -> list[Obj]:
        return jobs(self.cluster, self.namespace)

    def pods(self) -> list[Obj]:
        return pods(self.cluster, self.namespace)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, namespace=self.namespace, check=check, timeout=timeout)


@contextlib.contextmanager
def operator_env(cluster: Cluster, namespace: str, sample_volume: Path, tmp_path: Path, *,
                 capacity: int = 4, pvcs: tuple[str, ...] = (SOURCE_PVC, DEST_PVC),
                 operator_env_vars: dict[str, str] | None = None, start_operator: bool = True) -> Iterator[Env]:
    """PVCs, the operator's ServiceAccount + RBAC, a fake kubelet mapping the PVCs to directories, the operator."""
    if pvcs:
        create_pvcs(cluster, namespace, *pvcs)
    destination = tmp_path / "destination-volume"
    destination.mkdir()
    with operator_identity(cluster, namespace) as (kubeconfig, rbac):
        operator = OperatorProcess(kubeconfig=kubeconfig, namespaces=[namespace], log_dir=tmp_path / "operator",
                                   env=dict(operator_env_vars or {}))
        kubelet = FakeKubelet(cluster, namespace=namespace, capacity=capacity, workdir=tmp_path / "kubelet",
                              volumes={SOURCE_PVC: sample_volume, DEST_PVC: destination})
        kubelet.start()
        try:
            if start_operator:
                operator.start()
            yield Env(cluster=cluster, namespace=namespace, source=sample_volume, destination=destination,
                      kubelet=kubelet, operator=operator, kubeconfig=kubeconfig, rbac=rbac)
        finally:
            try:
                operator.stop()
            finally:
                kubelet.stop()


