"""Fixtures for the integration tests: the local Kubernetes control plane (tests/k8s/fixtures.py).

$KUBECONFIG is pointed at the session's future kubeconfig HERE, at import time: the ``kubernetes`` package reads it
once when it is imported (kopf's login handlers use it too), and a fixture would be too late.
"""

from tests.integration.operator_env import (  # noqa: F401 - fixtures of the operator tests
    ms2mg_crd,
    sample_volume,
)
from tests.k8s.fixtures import (  # noqa: F401 - fixtures are registered by import
    k8s_cluster,
    k8s_cluster_crds,
    k8s_namespace,
    prepare_kubeconfig_env,
)

prepare_kubeconfig_env()
