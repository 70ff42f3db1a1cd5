"""The chart's CRD template is the CRD generated from the pydantic models (the same source as crds/).

The template text is compared with `crdgen.render_chart_template()` (fails with the regenerate command), and the
CRD `helm template` renders is compared, as data, with `crdgen.build_crd()` and with the committed crds/ file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ms2mg_operator import crdgen
from tests.charts.conftest import REPO, find, one, render

TEMPLATE = REPO / crdgen.CHART_TEMPLATE
REGENERATE = f"`{crdgen.REGENERATE_COMMAND}` (from the repository root)"


def test_chart_crd_template_matches_the_models() -> None:
    assert TEMPLATE.is_file(), f"{TEMPLATE} is missing; generate it with {REGENERATE}"
    assert TEMPLATE.read_text(encoding="utf-8") == crdgen.render_chart_template(), (
        f"{TEMPLATE.relative_to(REPO)} differs from ms2mg_operator/api/v1alpha1.py; regenerate it with {REGENERATE}")


def test_crdgen_check_covers_the_chart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    assert crdgen.main(["--check"]) == 0  # both default outputs: crds/ and the chart template
    stale = tmp_path / "crd.yaml"
    stale.write_text(crdgen.render_chart_template().replace("maxLength: 1024", "maxLength: 1025", 1))
    assert crdgen.main(["--check", "--chart-template", str(stale)]) == 1
    assert crdgen.main(["--chart-template", str(stale)]) == 0
    assert stale.read_text() == crdgen.render_chart_template()


def without_metadata_extras(crd: dict[str, Any]) -> dict[str, Any]:
    return {**crd, "metadata": {"name": crd["metadata"]["name"]}}


@pytest.mark.k8s
def test_rendered_crd_equals_the_generated_crd() -> None:
    rendered = one(render(), "CustomResourceDefinition")
    assert without_metadata_extras(rendered) == without_metadata_extras(crdgen.build_crd())
    committed = yaml.safe_load((REPO / crdgen.DEFAULT_OUTPUT).read_text())
    assert without_metadata_extras(rendered) == without_metadata_extras(committed)
    labels = rendered["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "ms2mg"  # the label crds/ carries too
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


@pytest.mark.k8s
def test_crds_keep_and_enabled_switches() -> None:
    not_kept = one(render("--set", "crds.keep=false"), "CustomResourceDefinition")
    assert "annotations" not in not_kept["metadata"]
    assert find(render("--set", "crds.enabled=false"), "CustomResourceDefinition") == []
