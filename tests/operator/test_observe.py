"""Parsing Job and Pod dicts and the converter's outputs: lenient, never raising."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from ms2mg_converter.result import ConversionResult, ProgressEvent
from ms2mg_operator.keys import Keys
from ms2mg_operator.observe import (
    PodInfo,
    Progress,
    job_info,
    last_progress,
    newest_pod,
    parse_progress,
    parse_result,
    parse_time,
    pod_info,
)

KEYS = Keys()

RESULT = ConversionResult(status="Succeeded", reason="Converted", files=5, bytes=1234, seconds=12.5,
                          padded_vocab_size=32256, manifest_path="/mnt/destination/x/ms2mg-manifest.json",
                          verified=True, converter_version="0.1.0")


def job(status: dict[str, Any] | None = None, *, suspend: bool | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "llama-g2-abc", "labels": {"ms2mg.io/generation": "2"}},
            "spec": {} if suspend is None else {"suspend": suspend}, "status": status or {}}


def pod(phase: str, state: dict[str, Any] | None = None, *, created: str = "2026-11-27T10:00:00Z",
        container: str = "convert", generation: str = "2") -> dict[str, Any]:
    statuses = [] if state is None else [{"name": container, "state": state}]
    return {"metadata": {"name": f"p-{created[-3:-1]}", "creationTimestamp": created,
                         "labels": {"ms2mg.io/generation": generation}},
            "status": {"phase": phase, "containerStatuses": statuses}}


def test_job_info_running() -> None:
    info = job_info(job({"active": 1, "startTime": "2026-11-27T10:00:00Z"}))
    assert info.name == "llama-g2-abc" and not info.deleting
    assert not info.complete and info.failure is None and not info.suspended
    assert info.start_time == datetime(2026, 11, 27, 10, tzinfo=UTC)


def test_job_info_complete_and_failed() -> None:
    done = job_info(job({"succeeded": 1, "completionTime": "2026-11-27T11:00:00Z",
                         "conditions": [{"type": "Complete", "status": "True"}]}))
    assert done.complete and done.completion_time is not None
    failed = job_info(job({"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many",
         "lastTransitionTime": "2026-11-27T12:00:00Z"}]}))
    assert failed.failure == ("BackoffLimitExceeded", "too many")
    assert failed.completion_time == datetime(2026, 11, 27, 12, tzinfo=UTC)


def test_job_info_tolerates_garbage() -> None:
    info = job_info({"metadata": "x", "spec": [], "status": {"active": "many", "conditions": "no"}})
    assert info.name == "" and info.failure is None and not info.complete
    assert job_info(job(suspend=True)).suspended
    deleting = job()
    deleting["metadata"]["deletionTimestamp"] = "2026-11-27T12:00:00Z"
    assert job_info(deleting).deleting


def test_pod_info_states() -> None:
    waiting = pod_info(pod("Pending", {"waiting": {"reason": "ImagePullBackOff", "message": "no image"}}),
                       "convert", KEYS)
    assert waiting.generation == 2
    assert (waiting.phase, waiting.waiting_reason, waiting.waiting_message) == (
        "Pending", "ImagePullBackOff", "no image")
    done = pod_info(pod("Failed", {"terminated": {"exitCode": 3, "reason": "Error", "message": "{}"}}),
                    "convert", KEYS)
    assert (done.exit_code, done.terminated_reason, done.termination_message) == (3, "Error", "{}")
    assert done.finished and not waiting.finished
    other = pod_info(pod("Running", {"running": {}}, container="sidecar", generation="x"), "convert", KEYS)
    assert other.exit_code is None and other.phase == "Running" and other.generation is None
    assert pod_info({}, "convert", KEYS).phase == "Pending"


def test_newest_pod() -> None:
    old = PodInfo(name="a", phase="Failed", created=datetime(2026, 1, 1, tzinfo=UTC))
    new = PodInfo(name="b", phase="Running", created=datetime(2026, 1, 2, tzinfo=UTC))
    unknown = PodInfo(name="c", phase="Pending")
    assert newest_pod([old, new, unknown]) is new
    assert newest_pod([]) is None


@pytest.mark.parametrize(("log", "expected"), [
    (None, None),
    ("", None),
    ('{"done": 1, "total": 4, "bytes": 10}\n{"done": 2, "total": 4, "bytes": 20}\n', Progress(2, 4)),
    ('{"done": 3, "total": 4, "bytes": 30}\nms2mg: wrote mp_rank_01_001\n{"level": "info"}\n', Progress(3, 4)),
    ('{"done": 3, "tot', None),
    ("plain text only", None),
    # a newer converter's line with more fields still reads (and no "bytes" is needed)
    ('{"done": 5, "total": 9, "bytes": 1, "stage": "write", "file": "mp_rank_00", "eta": 1.5}\n', Progress(5, 9)),
    ('{"done": 6, "total": 9}\n', Progress(6, 9)),
    # what is not a progress line is skipped
    ('{"done": 2, "total": 4}\n{"done": "7", "total": 9}\n', Progress(2, 4)),
    ('{"done": 2, "total": 4}\n{"done": 10, "total": 9}\n', Progress(2, 4)),
    ('{"done": 2, "total": 4}\n{"done": true, "total": 9}\n', Progress(2, 4)),
    ('{"done": 2, "total": 4}\n[1, 2]\n', Progress(2, 4)),
])
def test_last_progress(log: str | None, expected: Progress | None) -> None:
    assert last_progress(log) == expected


def test_the_converters_own_lines_parse() -> None:
    line = ProgressEvent(done=37, total=112, bytes=10).model_dump_json()
    assert parse_progress(line) == Progress(37, 112) and str(parse_progress(line)) == "37/112"


@pytest.mark.parametrize(("message", "expected"), [
    (RESULT.to_json(), RESULT),
    (json.dumps({**json.loads(RESULT.to_json()), "someFutureField": 1}), RESULT),
    ("Traceback (most recent call last):\n  ...", None),
    ("", None),
    (None, None),
    ("[1, 2]", None),
    ('{"status": "Exploded"}', None),
    (RESULT.to_json()[:40], None),
])
def test_parse_result(message: str | None, expected: ConversionResult | None) -> None:
    assert parse_result(message) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-11-27T10:00:00Z", datetime(2026, 11, 27, 10, tzinfo=UTC)),
    ("2026-11-27T10:00:00", datetime(2026, 11, 27, 10, tzinfo=UTC)),
    ("yesterday", None),
    (42, None),
])
def test_parse_time(value: object, expected: datetime | None) -> None:
    assert parse_time(value) == expected
