"""Fixtures for the container image tests (scripts/image/, docs/image.md).

  image_daemon  (session) DOCKER_HOST of the CI dockerd; started with scripts/image/dockerd.sh if it is not running
                and stopped again at the end of the session (only if this session started it)
  built_images  (session) scripts/image/build.sh run once: {target: Image(name, size_bytes)}; makes the base first
  smoke         (session) scripts/image/smoke.sh run once: its rc and its PASS/FAIL lines

Environment: MS2MG_SKIP_IMAGE=1 skips the daemon-backed tests instead of failing where there is no root/docker.io;
MS2MG_CACHE and MS2MG_IMAGE_TAG are passed through to the scripts. Needs root the first time (apt-get install
docker.io debootstrap, debootstrap, dockerd).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "image"
TARGETS = ("converter", "operator")
BUILD_TIMEOUT_S = 1800  # cold: base image + torch download; measured ~4 min on 2 cores

_sizes: dict[str, int] = {}


@dataclass(frozen=True)
class Image:
    name: str
    size_bytes: int


@dataclass(frozen=True)
class Smoke:
    returncode: int
    lines: list[str]
    output: str

    def passed(self, prefix: str) -> bool:
        return any(line.startswith(f"PASS {prefix}") for line in self.lines)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "image: builds and runs the container images (root, docker.io; scripts/image/)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _sizes:
        terminalreporter.write_sep("-", "ms2mg image sizes")
        for name, size in _sizes.items():
            terminalreporter.write_line(f"{name}: {size / 1e6:.0f} MB ({size} bytes)")


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def image_daemon() -> Iterator[dict[str, str]]:
    if os.environ.get("MS2MG_SKIP_IMAGE") == "1":
        pytest.skip("MS2MG_SKIP_IMAGE=1: container image tests skipped")
    if os.geteuid() != 0:
        pytest.fail("the image tests need root (dockerd, debootstrap); set MS2MG_SKIP_IMAGE=1 to skip them")
    dockerd = str(SCRIPTS / "dockerd.sh")
    env = dict(os.environ)
    out = _run([dockerd, "env"], env, 30)
    key, _, value = out.stdout.strip().removeprefix("export ").partition("=")
    assert key == "DOCKER_HOST", out
    env["DOCKER_HOST"] = value
    started = False
    if _run([dockerd, "status"], env, 60).returncode != 0:
        res = _run([dockerd, "start"], env, 600)
        if res.returncode != 0:
            pytest.fail(f"dockerd.sh start failed:\n{res.stdout}{res.stderr}")
        started = True
    try:
        yield env
    finally:
        if started:
            res = _run([dockerd, "stop"], env, 120)
            print(res.stderr, file=sys.stderr, end="")


@pytest.fixture(scope="session")
def built_images(image_daemon: dict[str, str]) -> dict[str, Image]:
    res = _run([str(SCRIPTS / "build.sh")], image_daemon, BUILD_TIMEOUT_S)
    if res.returncode != 0:
        pytest.fail(f"scripts/image/build.sh failed (rc {res.returncode}):\n{res.stderr[-6000:]}")
    images: dict[str, Image] = {}
    for line in res.stdout.splitlines():
        # image localhost/ms2mg-converter:dev size_bytes=914592717 size=915 MB (...)
        if line.startswith("image "):
            _, name, size, *_ = line.split()
            target = name.rsplit("/", 1)[-1].split(":")[0].removeprefix("ms2mg-")
            images[target] = Image(name, int(size.removeprefix("size_bytes=")))
            _sizes[name] = images[target].size_bytes
    assert set(images) == set(TARGETS), res.stdout
    return images


@pytest.fixture(scope="session")
def smoke(built_images: dict[str, Image], image_daemon: dict[str, str]) -> Smoke:
    res = _run([str(SCRIPTS / "smoke.sh")], image_daemon, 600)
    lines = [line for line in res.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    return Smoke(res.returncode, lines, res.stdout + res.stderr)
