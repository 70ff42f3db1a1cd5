"""Fixtures and helpers of the Helm chart tests (charts/ms2mg, docs/helm.md).

The control plane's fixtures (`k8s_cluster`, `k8s_namespace`) are registered once for the session in tests/conftest.py.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.cluster import cache_dir

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ms2mg"
VALUES_DIR = Path(__file__).resolve().parent / "values"
#: the documented values variants (docs/helm.md "Tested variants"), by name
VARIANTS = {p.stem: p for p in sorted(VALUES_DIR.glob("*.yaml"))}
RELEASE_NAMESPACE = "ms2mg-system"

Manifest = dict[str, Any]


def helm_binary(major: int = 3) -> Path:
    """helm from the cache of scripts/k8s/get-tools.sh (helm 3.17 / helm 4.1). Missing: a failure, never a skip."""
    binary = cache_dir() / "tools" / "bin" / ("helm" if major == 3 else f"helm{major}")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} not found: run scripts/k8s/setup.sh (installs helm 3 and 4 into $MS2MG_CACHE)",
                    pytrace=False)
    return binary


def run_helm(*args: str, major: int = 3, check: bool = True,
             tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a helm command that needs no cluster (lint, template). ``check``: fail the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    if tmp is not None:
        env.update(HELM_CACHE_HOME=str(tmp / "cache"), HELM_CONFIG_HOME=str(tmp / "config"),
                   HELM_DATA_HOME=str(tmp / "data"))
    proc = subprocess.run([str(helm_binary(major)), *args], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def variant_args(variant: str | None) -> list[str]:
    return [] if variant is None else ["-f", str(VARIANTS[variant])]


def template_text(*args: str, variant: str | None = None, major: int = 3, release: str = "ms2mg",
                  namespace: str = RELEASE_NAMESPACE) -> str:
    return run_helm("template", release, str(CHART), "--namespace", namespace, *variant_args(variant), *args,
                    major=major).stdout


def render(*args: str, variant: str | None = None, major: int = 3, release: str = "ms2mg",
           namespace: str = RELEASE_NAMESPACE) -> list[Manifest]:
    """``helm template`` of the chart, parsed (empty documents dropped)."""
    text = template_text(*args, variant=variant, major=major, release=release, namespace=namespace)
    return [d for d in yaml.safe_load_all(text) if d]


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def deep_merge(base: Any, override: Any) -> Any:
    """Helm's value coalescing for plain data: maps merge recursively, everything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def chart_values() -> dict[str, Any]:
    return dict(yaml.safe_load((CHART / "values.yaml").read_text()))


def variant_values(variant: str) -> dict[str, Any]:
    return dict(deep_merge(chart_values(), yaml.safe_load(VARIANTS[variant].read_text()) or {}))
