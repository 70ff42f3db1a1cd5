"""README.md's CheckpointConversion field reference is generated from the model and up to date."""

from __future__ import annotations

from ms2mg_operator.api.v1alpha1 import CheckpointConversionSpec
from ms2mg_operator.reference import COMMAND, README, main, render


def test_readme_reference_is_current() -> None:
    assert main(["--check"]) == 0, f"README.md's field reference is stale; regenerate it with: {COMMAND}"


def test_every_spec_field_is_documented() -> None:
    text = render()
    for name, field in CheckpointConversionSpec.model_fields.items():
        alias = field.alias or name
        assert f"| `spec.{alias}` |" in text, alias
    assert "| `status.conditions[].type` |" in text
    assert render() in README.read_text()
