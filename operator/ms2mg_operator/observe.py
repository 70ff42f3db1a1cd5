"""Facts the status depends on, parsed from Job and Pod dicts and the converter's outputs (pure functions).

The dicts are raw API objects (camelCase, as served). Parsing is lenient: a missing or malformed field reads
as "unknown", never as an exception; a termination message that is not the converter's JSON (a crash, a kill)
reads as "no result"; a progress line may carry fields this operator does not know (a newer converter), which
are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import ValidationError

from ms2mg_converter.result import ConversionResult
from ms2mg_operator.keys import Keys


@dataclass(frozen=True)
class JobInfo:
    name: str
    suspended: bool
    complete: bool
    failure: tuple[str, str] | None
    start_time: datetime | None
    completion_time: datetime | None
    deleting: bool = False
    """The Job has a deletionTimestamp (e.g. a foreground deletion waits for its pods)."""


@dataclass(frozen=True)
class PodInfo:
    name: str
    phase: str
    generation: int | None = None
    created: datetime | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    exit_code: int | None = None
    terminated_reason: str | None = None
    termination_message: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True)
class Progress:
    """The last `--progress json` line: tensor groups done of total (other fields of the line are ignored)."""

    done: int
    total: int

    def __str__(self) -> str:
        return f"{self.done}/{self.total}"


@dataclass(frozen=True)
class Observation:
    """What is known about a generation's run: its Job, newest pod and progress, and two facts of its spec.
    `job=None, job_deleted=False` means: nothing yet. The only input of the status derivation besides the
    previous status."""

    job: JobInfo | None
    job_deleted: bool = False
    pod: PodInfo | None = None
    progress: Progress | None = None
    verify: bool = True
    queued: bool = False


def _get(obj: object, *path: str) -> object:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _str(obj: object) -> str | None:
    return obj if isinstance(obj, str) else None


def _count(obj: object) -> int | None:
    return obj if isinstance(obj, int) and not isinstance(obj, bool) and obj >= 0 else None


def _label_int(obj: object) -> int | None:
    return int(obj) if isinstance(obj, str) and obj.isdigit() else None


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp from the API, or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _true_condition(conditions: object, kind: str) -> Mapping[str, object] | None:
    for cond in conditions if isinstance(conditions, list) else []:
        if isinstance(cond, Mapping) and cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def job_info(job: Mapping[str, object]) -> JobInfo:
    """The facts of a batch/v1 Job dict that the status depends on."""
    conditions = _get(job, "status", "conditions")
    failed = _true_condition(conditions, "Failed")
    completion = parse_time(_get(job, "status", "completionTime"))
    if failed is not None and completion is None:
        completion = parse_time(failed.get("lastTransitionTime"))
    return JobInfo(
        name=_str(_get(job, "metadata", "name")) or "",
        suspended=_get(job, "spec", "suspend") is True,
        complete=_true_condition(conditions, "Complete") is not None,
        failure=None if failed is None else (_str(failed.get("reason")) or "JobFailed",
                                             _str(failed.get("message")) or ""),
        start_time=parse_time(_get(job, "status", "startTime")),
        completion_time=completion,
        deleting=bool(_get(job, "metadata", "deletionTimestamp")),
    )


def pod_info(pod: Mapping[str, object], container: str, keys: Keys) -> PodInfo:
    """The facts of a v1 Pod dict: phase, generation, and the converter container's waiting or terminated
    state."""
    statuses = _get(pod, "status", "containerStatuses")
    state: object = None
    for item in statuses if isinstance(statuses, list) else []:
        if isinstance(item, Mapping) and item.get("name") == container:
            state = item.get("state")
    waiting, terminated = _get(state, "waiting"), _get(state, "terminated")
    exit_code = _get(terminated, "exitCode")
    return PodInfo(
        name=_str(_get(pod, "metadata", "name")) or "",
        phase=_str(_get(pod, "status", "phase")) or "Pending",
        generation=_label_int(_get(pod, "metadata", "labels", keys.generation)),
        created=parse_time(_get(pod, "metadata", "creationTimestamp")),
        waiting_reason=_str(_get(waiting, "reason")),
        waiting_message=_str(_get(waiting, "message")),
        exit_code=exit_code if isinstance(exit_code, int) else None,
        terminated_reason=_str(_get(terminated, "reason")),
        termination_message=_str(_get(terminated, "message")),
    )


def newest_pod(pods: Sequence[PodInfo]) -> PodInfo | None:
    """The most recently created pod (the Job's current attempt)."""
    epoch = datetime.min.replace(tzinfo=UTC)
    return max(pods, key=lambda p: (p.created or epoch, p.name), default=None)


def parse_progress(line: str) -> Progress | None:
    """A `--progress json` line (`{"done": n, "total": m, ...}`); None for anything else. Lenient: fields
    other than `done` and `total` are ignored, so a newer converter's richer lines still read."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    done, total = _get(data, "done"), _get(data, "total")
    done, total = _count(done), _count(total)
    if done is None or total is None or done > total:
        return None
    return Progress(done=done, total=total)


def last_progress(log_text: str | None) -> Progress | None:
    """The last progress line in a log tail (other lines, e.g. log messages, are skipped)."""
    for line in reversed((log_text or "").splitlines()):
        progress = parse_progress(line)
        if progress is not None:
            return progress
    return None


def parse_result(message: str | None) -> ConversionResult | None:
    """The converter's JSON termination message; None for anything else (a crash, a truncated message)."""
    try:
        data = json.loads(message or "")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    known = {f.alias or name for name, f in ConversionResult.model_fields.items()} | set(
        ConversionResult.model_fields)
    try:
        return ConversionResult.model_validate({k: v for k, v in data.items() if k in known})
    except ValidationError:
        return None
