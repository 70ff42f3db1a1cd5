"""Every CheckpointConversion in examples/ is valid: against the operator's model and the CRD's schema."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ms2mg_operator.api.v1alpha1 import CheckpointConversionSpec, CheckpointConversionStatus
from ms2mg_operator.observe import JobInfo, Observation, PodInfo
from ms2mg_operator.status import Acceptance, derive_status

# Kubernetes CRD schemas are OpenAPI v3.0: draft-4 keywords (boolean exclusiveMinimum/exclusiveMaximum).
OPENAPI_V3 = jsonschema.Draft4Validator
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CRD = yaml.safe_load((REPO / "crds" / "checkpointconversions.ms2mg.io.yaml").read_text())


def conversions() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in EXAMPLES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and doc.get("kind") == "CheckpointConversion":
                out.append((f"{path.name}#{i}", doc))
    return out


def test_every_example_parses_and_has_resources() -> None:
    assert {p.name for p in EXAMPLES} >= {"conversion.yaml", "tp-pp-sweep.yaml", "kueue-conversion.yaml",
                                          "argocd-application.yaml"}
    assert len(conversions()) >= 5


@pytest.mark.parametrize(("name", "doc"), conversions(), ids=[n for n, _ in conversions()])
def test_example_is_a_valid_conversion(name: str, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ms2mg.io/v1alpha1"
    CheckpointConversionSpec.model_validate(doc["spec"])
    schema = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    jsonschema.validate(doc["spec"], schema, cls=OPENAPI_V3)


def test_the_docs_example_matches_the_reference_command() -> None:
    doc = yaml.safe_load((REPO / "examples" / "conversion.yaml").read_text())
    spec = CheckpointConversionSpec.model_validate(doc["spec"])
    assert (spec.parallelism.tensor, spec.parallelism.pipeline) == (2, 2)
    assert spec.model is not None
    assert (spec.model.num_layers, spec.model.hidden_size, spec.model.ffn_hidden_size) == (32, 4096, 16384)
    assert (spec.model.num_attention_heads, spec.model.num_query_groups) == (32, 16)
    assert spec.vocab.true_size == 128000 and spec.dtype == "bf16"


# --- the Argo CD health check (examples/argocd-application.yaml), run in Lua 5.1 as Argo CD (gopher-lua) runs it ---
NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
CREATED = Acceptance(True, "JobCreated", "Job c-g1 created for generation 1.")


def health_check() -> str:
    docs = yaml.safe_load_all((REPO / "examples" / "argocd-application.yaml").read_text())
    config = next(d for d in docs if d and d.get("kind") == "ConfigMap")
    return str(config["data"]["resource.customizations.health.ms2mg.io_CheckpointConversion"])


def assess(obj: dict[str, Any]) -> tuple[str, str]:
    from lupa.lua51 import LuaRuntime  # type: ignore[import-not-found]

    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(health_check())
    return str(result["status"]), str(result["message"])


def job(**kw: Any) -> JobInfo:
    base: dict[str, Any] = {"name": "c-g1", "suspended": False, "complete": False, "failure": None,
                            "start_time": NOW, "completion_time": None}
    return JobInfo(**{**base, **kw})


def resource(status: CheckpointConversionStatus | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "c", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


def status_of(acceptance: Acceptance = CREATED, observation: Observation | None = None,
              previous: CheckpointConversionStatus | None = None) -> CheckpointConversionStatus:
    return derive_status(previous, generation=1, now=NOW, acceptance=acceptance, observation=observation)


RESULT_OK = '{"status": "Succeeded", "reason": "Converted", "message": "converted", "verified": true}'
RESULT_BAD = '{"status": "Failed", "reason": "ShapeMismatch", "exitCode": 3, "message": "--num-layers 6 but 4"}'


@pytest.mark.parametrize(("status", "expected", "says"), [
    (None, "Progressing", "Waiting for the operator"),
    (status_of(observation=Observation(job=job())), "Progressing", "Waiting for a pod"),
    (status_of(observation=Observation(job=job(), pod=PodInfo("p", "Running"))), "Progressing", "converting"),
    (status_of(observation=Observation(job=job(suspended=True), queued=True)), "Suspended", "until its queue"),
    (status_of(Acceptance(False, "DestinationConflict", "written by the older first")), "Progressing", "older"),
    (status_of(Acceptance(False, "ImageNotAllowed", "image x is not allowed")), "Degraded", "not allowed"),
    (status_of(observation=Observation(job=job(complete=True), pod=PodInfo(
        "p", "Succeeded", exit_code=0, termination_message=RESULT_OK))), "Healthy", "converted"),
    (status_of(observation=Observation(job=job(failure=("PodFailurePolicy", "")), pod=PodInfo(
        "p", "Failed", exit_code=3, termination_message=RESULT_BAD))), "Degraded", "--num-layers 6"),
])
def test_argocd_health(status: CheckpointConversionStatus | None, expected: str, says: str) -> None:
    health, message = assess(resource(status))
    assert health == expected and says in message, (health, message)


def test_argocd_health_of_a_just_pushed_change_is_not_healthy() -> None:
    """Generation 2 was just pushed; the status still describes the converted generation 1."""
    done = status_of(observation=Observation(job=job(complete=True), pod=PodInfo(
        "p", "Succeeded", exit_code=0, termination_message=RESULT_OK)))
    assert assess(resource(done))[0] == "Healthy"
    assert assess(resource(done, generation=2)) == ("Progressing", "Waiting for the operator to handle this "
                                                                  "generation")
