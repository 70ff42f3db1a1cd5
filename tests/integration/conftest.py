"""Fixtures of the operator integration tests (the control plane's fixtures are registered in tests/conftest.py)."""

from tests.integration.operator_env import (  # noqa: F401 - fixtures of the operator tests
    ms2mg_crd,
    report,
    sample_volume,
)
