"""Fixtures of the reliability tests: world-writable work directories and an optional report directory.

Set MS2MG_RELIABILITY_OUT=DIR to keep the measured outcomes (JSON) that docs/reliability.md reports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.corpus import world_dir


@pytest.fixture
def world() -> Iterator[Path]:
    """A fresh sticky, world-writable directory under /tmp (an unprivileged converter can work in it)."""
    with world_dir() as root:
        yield root


def record(name: str, data: Any) -> None:
    """Keep a measurement for docs/reliability.md when MS2MG_RELIABILITY_OUT is set."""
    out = os.environ.get("MS2MG_RELIABILITY_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
