"""MS2MG_STRICT_SKIPS=1 turns skips into failures (tests/strict_skips.py), as .ci/run sets it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = '''
import pytest

def test_runs():
    assert True

def test_skips():
    pytest.skip("no tmpfs here")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
'''


def run(tmp_path: Path, strict: str | None, body: str = SAMPLE) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sample.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "MS2MG_STRICT_SKIPS"}
    env["PYTHONPATH"] = str(REPO)
    if strict is not None:
        env["MS2MG_STRICT_SKIPS"] = strict
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.strict_skips", "-p", "no:cacheprovider",
                           "-q", "-rs", "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"),
                           str(tmp_path / "test_sample.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("strict", [None, "0"])
def test_skips_stay_skips_by_default(tmp_path: Path, strict: str | None) -> None:
    proc = run(tmp_path, strict)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped, 1 xfailed" in proc.stdout


def test_ci_fails_on_a_skip(tmp_path: Path) -> None:
    proc = run(tmp_path, "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 1 passed, 1 xfailed" in proc.stdout
    assert "MS2MG_STRICT_SKIPS=1 (CI) allows no skip: Skipped: no tmpfs here" in proc.stdout


def test_ci_fails_on_a_skipped_module(tmp_path: Path) -> None:
    proc = run(tmp_path, "1", 'import pytest\npytest.skip("no setpriv", allow_module_level=True)\n')
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "MS2MG_STRICT_SKIPS=1 (CI) allows no skip" in proc.stdout and "no setpriv" in proc.stdout
