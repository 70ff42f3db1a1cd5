"""values.yaml, values.schema.json and the values reference in docs/helm.md agree (pure Python, no helm).

* values.yaml and every documented variant (tests/charts/values/*.yaml, merged over values.yaml as helm does)
  validate against values.schema.json; typos, unknown keys and wrong types are refused;
* the schema is strict on the chart's own objects and open on Kubernetes pass-through blocks, and it describes
  exactly the keys values.yaml has;
* every value in values.yaml has a comment; docs/helm.md's values table is generated from those comments
  (``UPDATE_DOCS=1 .venv/bin/pytest tests/charts/test_values_schema.py`` rewrites it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from tests.charts.conftest import CHART, REPO, VARIANTS, chart_values, deep_merge, variant_values

SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
DOCS = REPO / "docs" / "helm.md"
TABLE_START, TABLE_END = "<!-- values-table:start -->", "<!-- values-table:end -->"
UPDATE_COMMAND = "UPDATE_DOCS=1 .venv/bin/pytest tests/charts/test_values_schema.py"

#: Kubernetes objects the chart passes through as they are: the schema keeps them open
PASS_THROUGH = {
    "resources", "podSecurityContext", "securityContext", "affinity", "jobDefaults.resources",
    "nodeSelector", "podAnnotations", "podLabels", "serviceAccount.annotations",
    "converterServiceAccount.annotations", "metrics.service.annotations", "metrics.serviceMonitor.labels",
    "global",
}


def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(SCHEMA)


def errors(values: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator().iter_errors(values)]


def own_objects(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object schema with `properties` (the chart's own objects), with its dotted path."""
    if node.get("type") == "object" and "properties" in node:
        yield path, node
        for key, child in node["properties"].items():
            yield from own_objects(child, f"{path}.{key}" if path else key)


# --- values.yaml and the variants ----------------------------------------------------------------------------------
def test_schema_is_valid_draft7() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)


def test_default_values_validate() -> None:
    assert errors(chart_values()) == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_validates(variant: str) -> None:
    assert errors(variant_values(variant)) == []


def test_there_are_documented_variants() -> None:
    assert {"namespaced", "production", "bring-your-own"} <= set(VARIANTS)
    docs = DOCS.read_text()
    for path in VARIANTS.values():
        assert f"tests/charts/values/{path.name}" in docs, f"{path.name} is not described in docs/helm.md"
        assert path.read_text().startswith("# "), f"{path.name} must start with a comment saying what it is for"


# --- strictness ----------------------------------------------------------------------------------------------------
REFUSED = [
    pytest.param({"imagee": {"tag": "1"}}, "imagee", id="unknown-top-level-key"),
    pytest.param({"image": {"repo": "x"}}, "repo", id="typo-in-image"),
    pytest.param({"converterImage": {"tags": "1"}}, "tags", id="typo-in-converter-image"),
    pytest.param({"crds": {"enable": False}}, "enable", id="typo-in-crds"),
    pytest.param({"rbac": {"create": "yes"}}, "not of type 'boolean'", id="string-for-boolean"),
    pytest.param({"serviceAccount": {"automount": False}}, "automount", id="typo-in-service-account"),
    pytest.param({"converterServiceAccount": {"namespaces": ["a"]}}, "namespaces", id="typo-in-converter-sa"),
    pytest.param({"watchNamespaces": "ml"}, "not of type 'array'", id="namespace-string-not-list"),
    pytest.param({"watchNamespaces": ["ML_Team"]}, "does not match", id="namespace-not-dns-label"),
    pytest.param({"watchNamespaces": ["a", "a"]}, "non-unique", id="namespace-twice"),
    pytest.param({"logFormat": "xml"}, "is not one of", id="log-format"),
    pytest.param({"image": {"pullPolicy": "always"}}, "is not one of", id="pull-policy-case"),
    pytest.param({"image": {"digest": "sha256:abc"}}, "does not match", id="short-digest"),
    pytest.param({"jobDefaults": {"backofLimit": 1}}, "backofLimit", id="typo-in-job-defaults"),
    pytest.param({"jobDefaults": {"backoffLimit": -1}}, "less than the minimum", id="negative-backoff"),
    pytest.param({"jobDefaults": {"ttlSecondsAfterFinished": "1d"}}, "not of type 'integer'", id="ttl-string"),
    pytest.param({"jobDefaults": {"activeDeadlineSeconds": 0}}, "less than the minimum", id="zero-deadline"),
    pytest.param({"metrics": {"enable": True}}, "enable", id="typo-in-metrics"),
    pytest.param({"metrics": {"port": 70000}}, "greater than the maximum", id="port-range"),
    pytest.param({"metrics": {"serviceMonitor": {"interval": "soon"}}}, "does not match", id="duration"),
    pytest.param({"metrics": {"service": {"type": "Headless"}}}, "is not one of", id="service-type"),
    pytest.param({"liveness": {"path": "/live"}}, "path", id="typo-in-liveness"),
    pytest.param({"allowedImages": ["a,b"]}, "does not match", id="comma-in-allowed-image"),
    pytest.param({"allowedImages": ["registry.example.com/ml*"]}, "does not match", id="glob-not-a-prefix-pattern"),
    pytest.param({"allowedImages": ["*/x"]}, "does not match", id="star-inside-an-image-pattern"),
    pytest.param({"allowedServiceAccounts": ["Bad_SA"]}, "does not match", id="service-account-not-dns"),
    pytest.param({"allowedServiceAccounts": "sa"}, "not of type 'array'", id="service-account-string"),
    pytest.param({"extraEnv": [{"value": "x"}]}, "'name' is a required property", id="env-without-name"),
    pytest.param({"nodeSelector": {"pool": 1}}, "not of type 'string'", id="node-selector-value"),
    pytest.param({"fullnameOverride": "Bad_Name"}, "does not match", id="fullname-not-dns"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED)
def test_typos_and_wrong_types_are_refused(override: dict[str, Any], message: str) -> None:
    found = errors(deep_merge(chart_values(), override))
    assert found, f"{override} was accepted"
    assert any(message in e for e in found), found


def test_pass_through_blocks_stay_open() -> None:
    values = deep_merge(chart_values(), {
        "resources": {"limits": {"nvidia.com/gpu": 0, "memory": "1Gi"}},
        "podSecurityContext": {"fsGroupChangePolicy": "OnRootMismatch", "sysctls": []},
        "securityContext": {"privileged": False, "seLinuxOptions": {"level": "s0"}},
        "affinity": {"podAntiAffinity": {}},
        "tolerations": [{"operator": "Exists"}],
        "extraEnv": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "imagePullSecrets": [{"name": "a"}],
        "jobDefaults": {"resources": {"limits": {"ephemeral-storage": "10Gi"}}},
        "global": {"imageRegistry": "x"},
    })
    assert errors(values) == []


def test_own_objects_are_closed_and_pass_through_blocks_open() -> None:
    for path, node in own_objects(SCHEMA):
        assert node.get("additionalProperties") is False, f"{path or '<root>'} must have additionalProperties: false"
    for path in PASS_THROUGH:
        node = SCHEMA
        for key in path.split("."):
            node = node["properties"][key]
        assert node.get("additionalProperties", True) is not False, path
        assert "properties" not in node, path


def test_schema_describes_exactly_the_values() -> None:
    def compare(values: dict[str, Any], schema: dict[str, Any], path: str) -> None:
        props = schema["properties"]
        extra_in_schema = set(props) - set(values) - {"global"}
        assert not extra_in_schema, f"{path or '<root>'}: in the schema, not in values.yaml: {extra_in_schema}"
        assert not set(values) - set(props), f"{path or '<root>'}: not in the schema: {set(values) - set(props)}"
        for key, value in values.items():
            child = props[key]
            assert child.get("description"), f"{path}{key}: no description in the schema"
            if "properties" in child:
                assert isinstance(value, dict)
                compare(value, child, f"{path}{key}.")

    compare(chart_values(), SCHEMA, "")


# --- comments and the generated reference in docs/helm.md ----------------------------------------------------------
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][A-Za-z0-9]*):(?: |$)")


def values_comments() -> dict[str, str]:
    """Dotted key path -> the comment block right above it in values.yaml (example lines dropped)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = KEY_LINE.match(line)
        if match:
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([k for _, k in stack] + [match["key"]])
            stack.append((indent, match["key"]))
            text = " ".join(pending)
            comments[path] = text.split("For example:")[0].strip()
        pending = []
    return comments


def documented_keys(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, default) of every value a user sets: the chart's own leaves and pass-through blocks."""
    for key, value in values.items():
        child = schema["properties"][key]
        path = f"{prefix}{key}"
        if "properties" in child:
            yield from documented_keys(value, child, f"{path}.")
        else:
            yield path, value


def values_table() -> str:
    comments = values_comments()
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for path, default in documented_keys(chart_values(), SCHEMA):
        shown = json.dumps(default, separators=(", ", ": "))
        description = comments[path].replace("|", "\\|")
        rows.append(f"| `{path}` | `{shown}` | {description} |")
    return "\n".join(rows)


def test_every_value_has_a_comment() -> None:
    comments = values_comments()
    missing = [path for path, node in own_objects(SCHEMA) if path and not comments.get(path)]
    missing += [path for path, _ in documented_keys(chart_values(), SCHEMA) if not comments.get(path)]
    assert not missing, f"values.yaml keys without a comment right above them: {missing}"


def test_docs_values_table_is_generated_from_values_yaml() -> None:
    text = DOCS.read_text()
    assert TABLE_START in text and TABLE_END in text, f"docs/helm.md lacks the {TABLE_START} / {TABLE_END} markers"
    head, rest = text.split(TABLE_START, 1)
    current, tail = rest.split(TABLE_END, 1)
    expected = f"\n{values_table()}\n"
    if current != expected and os.environ.get("UPDATE_DOCS") == "1":
        DOCS.write_text(head + TABLE_START + expected + TABLE_END + tail)
        return
    assert current == expected, f"docs/helm.md's values table is out of date with values.yaml; run `{UPDATE_COMMAND}`"
