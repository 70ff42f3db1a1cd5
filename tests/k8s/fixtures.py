"""pytest fixtures for tests against the local control plane (see docs/k8s-testing.md).

Register them in a conftest.py with ``from tests.k8s.fixtures import *`` (tests/integration/conftest.py does) and
call :func:`prepare_kubeconfig_env` at conftest import time, before anything imports ``kubernetes``.

Fixtures:
  k8s_cluster       (session) a running :class:`~tests.k8s.cluster.Cluster`; started once, stopped at the end by PID
                    (also if tests fail; a watchdog stops it if pytest itself dies)
  k8s_cluster_crds  (session) CRD files installed *before* kube-controller-manager starts (default: none); override
                    it in a conftest to get immediate garbage collection of/by your custom resources
  k8s_namespace     (function) a fresh namespace, deleted (without waiting) afterwards

Environment:
  MS2MG_CACHE=DIR          where scripts/k8s/setup.sh put the binaries (default /var/cache/ms2mg)
  MS2MG_SKIP_K8S=1         skip the k8s tests instead of failing when the binaries are missing
  MS2MG_K8S_WORKDIR=DIR    work dir (kubeconfig, logs, etcd data); default $TMPDIR/ms2mg-k8s-<pid>
  MS2MG_K8S_ATTACH=DIR     use a control plane already started there by start-control-plane.sh; never stop it
  MS2MG_K8S_KEEP=1         keep the work dir (logs, certs) even when all tests passed
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s.cluster import (
    SETUP_HINT,
    Cluster,
    ControlPlaneError,
    missing_binaries,
    point_kubernetes_client_at,
)

__all__ = ["k8s_cluster", "k8s_cluster_crds", "k8s_namespace", "planned_workdir", "prepare_kubeconfig_env"]


def planned_workdir() -> Path:
    """The work dir the session's control plane will use (known before it starts, for $KUBECONFIG)."""
    if os.environ.get("MS2MG_K8S_ATTACH"):
        return Path(os.environ["MS2MG_K8S_ATTACH"]).resolve()
    if os.environ.get("MS2MG_K8S_WORKDIR"):
        return Path(os.environ["MS2MG_K8S_WORKDIR"]).resolve()
    return Path(tempfile.gettempdir()) / f"ms2mg-k8s-{os.getpid()}"


def prepare_kubeconfig_env() -> Path:
    """Point $KUBECONFIG (and an already imported ``kubernetes`` package) at the session's future kubeconfig.

    ``kubernetes.config`` reads $KUBECONFIG at import time, so this must run at conftest import.
    The file only exists once ``k8s_cluster`` has started.
    """
    kubeconfig = planned_workdir() / "kubeconfig"
    point_kubernetes_client_at(kubeconfig)
    return kubeconfig


@pytest.fixture(scope="session")
def k8s_cluster_crds() -> list[Path]:
    """CRD files to install before kube-controller-manager starts. Override in a conftest.py."""
    return []


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest, k8s_cluster_crds: list[Path]) -> Iterator[Cluster]:
    if os.environ.get("MS2MG_SKIP_K8S") == "1":
        pytest.skip("MS2MG_SKIP_K8S=1: Kubernetes control-plane tests skipped")

    attach = os.environ.get("MS2MG_K8S_ATTACH")
    if attach:
        cluster = Cluster.attach(attach, owned=False)
        point_kubernetes_client_at(cluster.kubeconfig)
        for crd in k8s_cluster_crds:
            cluster.apply_crd(crd)
        yield cluster
        return

    missing = missing_binaries()
    if missing:
        pytest.fail(
            "Kubernetes test control plane not available: missing "
            + ", ".join(map(str, missing))
            + f"\n-> {SETUP_HINT}, or set MS2MG_SKIP_K8S=1 to skip these tests.",
            pytrace=False,
        )

    workdir = planned_workdir()
    if workdir.exists():
        shutil.rmtree(workdir)
    try:
        cluster = Cluster.start(workdir, controller_manager=not k8s_cluster_crds, watch_pid=os.getpid())
    except ControlPlaneError as exc:
        pytest.fail(f"could not start the test control plane (logs in {workdir}):\n{exc}", pytrace=False)
    ok = False
    try:
        point_kubernetes_client_at(cluster.kubeconfig)
        if k8s_cluster_crds:
            for crd in k8s_cluster_crds:
                cluster.apply_crd(crd)
            cluster.start_controller_manager()
        ok = True
        yield cluster
    finally:
        try:
            cluster.stop(purge=True)
        finally:
            failed = not ok or request.session.testsfailed
            if failed or os.environ.get("MS2MG_K8S_KEEP") == "1":
                print(f"\n[k8s] control plane logs kept in {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def k8s_namespace(k8s_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; deleted afterwards (the namespace controller empties it)."""
    prefix = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-") or "t"
    ns = k8s_cluster.create_namespace(prefix)
    yield ns
    k8s_cluster.delete_namespace(ns, wait=False)
