"""Every CheckpointConversion in examples/ is valid: against the operator's model and the CRD's schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ms2mg_operator.api.v1alpha1 import CheckpointConversionSpec

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
    jsonschema.validate(doc["spec"], schema)


def test_the_docs_example_matches_the_reference_command() -> None:
    doc = yaml.safe_load((REPO / "examples" / "conversion.yaml").read_text())
    spec = CheckpointConversionSpec.model_validate(doc["spec"])
    assert (spec.parallelism.tensor, spec.parallelism.pipeline) == (2, 2)
    assert spec.model is not None
    assert (spec.model.num_layers, spec.model.hidden_size, spec.model.ffn_hidden_size) == (32, 4096, 16384)
    assert (spec.model.num_attention_heads, spec.model.num_query_groups) == (32, 16)
    assert spec.vocab.true_size == 128000 and spec.dtype == "bf16"
