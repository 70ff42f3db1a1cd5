"""The committed CRD is what the models generate, and it is a structural schema Kubernetes accepts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ms2mg_operator import crdgen
from ms2mg_operator.api.v1alpha1 import PATH_RULES
from tests.operator.test_api import ACCEPTED, spec_with

# Kubernetes CRD schemas are OpenAPI v3.0: draft-4 keywords (boolean exclusiveMinimum/exclusiveMaximum).
OPENAPI_V3 = jsonschema.Draft4Validator
REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / crdgen.DEFAULT_OUTPUT


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.get("properties", {}).items():
            yield from walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{path}{{}}")


def schema() -> dict[str, Any]:
    return crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[index]


def test_committed_crd_matches_the_models() -> None:
    assert COMMITTED.is_file(), f"{COMMITTED} is missing; generate it with: {crdgen.REGENERATE_COMMAND}"
    expected = crdgen.render_crd_yaml()
    assert COMMITTED.read_text(encoding="utf-8") == expected, (
        f"{COMMITTED.relative_to(REPO)} differs from ms2mg_operator/api/v1alpha1.py; regenerate it with "
        f"`{crdgen.REGENERATE_COMMAND}` (from the repository root)")


def test_committed_crd_is_one_yaml_document() -> None:
    docs = list(yaml.safe_load_all(COMMITTED.read_text(encoding="utf-8")))
    assert len(docs) == 1
    assert docs[0]["metadata"]["name"] == "checkpointconversions.ms2mg.io"


@pytest.mark.parametrize("forbidden", ["$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "nullable"])
def test_schema_is_structural(forbidden: str) -> None:
    for path, node in walk(schema()):
        assert forbidden not in node, path


def test_no_additional_properties_false_next_to_properties() -> None:
    for path, node in walk(schema()):
        assert not ("properties" in node and "additionalProperties" in node), path


def test_every_field_has_a_type_and_a_description() -> None:
    for path, node in walk(schema()):
        if path in ("", ".metadata"):
            continue
        assert "type" in node, f"{path} has no type"
        assert node.get("description") or path.endswith(("[]", "{}")), f"{path} has no description"


def test_defaults_only_in_spec_and_only_deliberate() -> None:
    defaulted = {path for path, node in walk(schema()) if "default" in node}
    assert defaulted == {
        ".spec.parallelism", ".spec.parallelism.tensor", ".spec.parallelism.pipeline",
        ".spec.vocab", ".spec.vocab.makeDivisibleBy", ".spec.vocab.padFill",
        ".spec.dtype", ".spec.transformerImpl", ".spec.verify", ".spec.overwrite", ".spec.finalNormExtraState",
        ".spec.allowNonfinite", ".spec.sourceDigest", ".spec.parallelism.expert", ".spec.output",
        ".spec.output.format", ".spec.moe.groupedGemm",
    }


def test_pass_through_blocks_are_open_objects() -> None:
    nodes = dict(walk(schema()))
    for path in (".spec.resources", ".spec.affinity", ".spec.tolerations[]"):
        assert nodes[path]["type"] == "object"
        assert nodes[path]["x-kubernetes-preserve-unknown-fields"] is True


def test_path_rules_and_conditions_list_map() -> None:
    nodes = dict(walk(schema()))
    assert nodes[".spec.source.path"]["x-kubernetes-validations"] == PATH_RULES
    assert nodes[".spec.destination.path"]["x-kubernetes-validations"] == PATH_RULES
    assert nodes[".spec"]["x-kubernetes-validations"][0]["rule"].startswith("self.source.pvc")
    conditions = nodes[".status.conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in nodes[".status.conditions[]"]["required"]


def test_names_columns_and_subresources() -> None:
    crd = crdgen.build_crd()
    spec: Any = crd["spec"]
    assert spec["names"]["shortNames"] == ["ckptconv"]
    assert spec["scope"] == "Namespaced"
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Status"] == ".status.phase"
    assert columns["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert columns["Message"] == '.status.conditions[?(@.type=="Ready")].message'
    assert columns["TP"] == ".spec.parallelism.tensor"
    assert columns["PP"] == ".spec.parallelism.pipeline"
    assert columns["Progress"] == ".status.progress"
    assert columns["Age"] == ".metadata.creationTimestamp"


@pytest.mark.parametrize("spec", ACCEPTED)
def test_schema_accepts_valid_resources(spec: dict[str, Any]) -> None:
    jsonschema.validate({"apiVersion": "ms2mg.io/v1alpha1", "kind": "CheckpointConversion",
                         "metadata": {"name": "x"}, "spec": spec}, schema(), cls=OPENAPI_V3)


@pytest.mark.parametrize("spec", [
    spec_with(**{"source.pvc": "Bad_Name"}), spec_with(**{"source.path": "a" * 1025}),
    spec_with(**{"source.path": "a\tb"}), spec_with(dtype="int8"), spec_with(**{"parallelism.tensor": 0}),
    spec_with(queueName="bad queue"),
])
def test_schema_rejects_malformed_resources(spec: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spec": spec}, schema(), cls=OPENAPI_V3)


def test_check_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "crd.yaml"
    assert crdgen.main(["--check", "--output", str(target)]) == 1
    assert crdgen.REGENERATE_COMMAND in capsys.readouterr().err
    assert crdgen.main(["--output", str(target)]) == 0
    assert crdgen.main(["--check", "--output", str(target)]) == 0
    target.write_text(target.read_text() + "# edited\n")
    assert crdgen.main(["--check", "--output", str(target)]) == 1
