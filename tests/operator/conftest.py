"""Fixtures of the operator tests: settings independent of the environment, sample resources."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ms2mg_operator.config import OperatorSettings

UID = "7f0c3a1e-5b2d-4c8e-9a41-0d6b2f9e1c11"
NAMESPACE = "ml"
CREATED = "2026-11-27T10:00:00Z"
SPEC: dict[str, Any] = {
    "source": {"pvc": "mindformers", "path": "llama2-7b"},
    "destination": {"pvc": "megatron", "path": "llama2-7b/tp2-pp2"},
    "parallelism": {"tensor": 2, "pipeline": 2},
}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    """Default settings, whatever MS2MG_* variables the calling environment has."""
    import os

    for key in [k for k in os.environ if k.startswith("MS2MG_")]:
        monkeypatch.delenv(key)
    return OperatorSettings(converter_image="registry.example/ms2mg-converter:0.1.0", metrics_port=0,
                            liveness_port=0)


def make_body(spec: dict[str, Any] | None = None, *, name: str = "llama", generation: int = 1,
              uid: str = UID, status: dict[str, Any] | None = None,
              created: str = CREATED) -> dict[str, Any]:
    """A CheckpointConversion object as the API serves it."""
    body: dict[str, Any] = {
        "apiVersion": "ms2mg.io/v1alpha1",
        "kind": "CheckpointConversion",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid, "generation": generation,
                     "creationTimestamp": created},
        "spec": copy.deepcopy(SPEC if spec is None else spec),
    }
    if status is not None:
        body["status"] = status
    return body
