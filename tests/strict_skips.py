"""`MS2MG_STRICT_SKIPS=1` (set by .ci/run): a skipped test is a failure.

Some tests skip when the machine cannot stage their case (no tmpfs mount, no chattr, no setpriv, a probe that
failed, no root). On a developer's laptop that is fine; on the CI machine, which runs as root and has all of them,
a skip means a check silently did not run. So CI turns every skip (of a test or of a whole module) into a failure
that names the reason. Expected failures (xfail) are not skips and are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

VARIABLE = "MS2MG_STRICT_SKIPS"


def strict() -> bool:
    return os.environ.get(VARIABLE, "") not in ("", "0")


def _reason(longrepr: Any) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail(report: pytest.TestReport | pytest.CollectReport) -> None:
    report.outcome = "failed"
    report.longrepr = f"skipped, but {VARIABLE}=1 (CI) allows no skip: {_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and strict() and not hasattr(report, "wasxfail"):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped and strict():
        _fail(report)
