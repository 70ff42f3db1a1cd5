"""Session-wide test setup: the local Kubernetes control plane's fixtures are registered once, here.

Registering them here (not per directory) gives one session-scoped control plane for every test directory
that uses it (tests/integration, tests/charts, ...), so `pytest` over the whole tree starts it once.
$KUBECONFIG is pointed at the session's future kubeconfig at import time: the ``kubernetes`` package reads it
once when it is imported, and a fixture would be too late (tests/k8s/fixtures.py).
"""

from tests.k8s.fixtures import (  # noqa: F401 - fixtures are registered by import
    k8s_cluster,
    k8s_cluster_crds,
    k8s_namespace,
    prepare_kubeconfig_env,
)
from tests.strict_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 - hooks

prepare_kubeconfig_env()
