"""Periodic work on single resources, without kopf timers.

kopf puts its finalizer on every resource a timer or daemon matches, so a resource deleted while the operator
is down would hang in Terminating. The operator needs only two kinds of periodic work, and only for few resources
at a time, so it keeps them in this schedule instead:

* `Task.PROGRESS`: read the running converter pod's log tail (logs have no watch events), every
  `MS2MG_PROGRESS_SECONDS`, while a pod runs;
* `Task.RECHECK`: admit a resource that waits for something that clears up by itself (a PVC, an older
  resource on the same destination, the previous generation's pods), every `MS2MG_RECHECK_SECONDS`, and at
  once after an event that may have cleared it (`kick`).

A resource that is queued, pending or finished is in no schedule: Job and pod watch events drive it. The
controller decides what each resource needs after every status derivation (`want`/`forget`); one daemon
thread runs what is due (`start`/`stop`). `run_due` is the whole loop body, callable from tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

logger = logging.getLogger(__name__)

Key = tuple[str, str]
"""(namespace, name) of a CheckpointConversion."""
MAX_SLEEP = 5.0


class Task(StrEnum):
    PROGRESS = "progress"
    RECHECK = "recheck"


@dataclass(frozen=True)
class Entry:
    task: Task
    uid: str
    due: float
    pod: str | None = None
    """The pod whose log a PROGRESS entry reads."""


Work = Callable[[Key, Entry], None]


class Poller:
    """The schedule, and the thread that works it off. Thread-safe."""

    def __init__(self, intervals: Mapping[Task, float], clock: Callable[[], float] = time.monotonic) -> None:
        self._intervals = dict(intervals)
        self._clock = clock
        self._entries: dict[Key, Entry] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def want(self, key: Key, task: Task, uid: str, pod: str | None = None) -> None:
        """Schedule `task` for `key`. An entry that already has this task (and pod) keeps its due time; a PROGRESS
        entry without a pod keeps the pod already scheduled, and is dropped when there is none."""
        with self._lock:
            old = self._entries.get(key)
            if task == Task.PROGRESS and pod is None:
                pod = old.pod if old is not None and old.task == task and old.uid == uid else None
                if pod is None:
                    self._entries.pop(key, None)
                    return
            if old is not None and (old.task, old.uid, old.pod) == (task, uid, pod):
                return
            self._entries[key] = Entry(task, uid, self._clock() + self._intervals[task], pod)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def kick(self, namespace: str, task: Task) -> int:
        """Make `task` due now for every resource of `namespace` that has it; returns how many."""
        now = self._clock()
        with self._lock:
            keys = [k for k, e in self._entries.items() if k[0] == namespace and e.task == task]
            for key in keys:
                self._entries[key] = replace(self._entries[key], due=now)
        if keys:
            self._wake.set()
        return len(keys)

    def scheduled(self) -> dict[Key, Entry]:
        with self._lock:
            return dict(self._entries)

    def _take_due(self) -> list[tuple[Key, Entry]]:
        now = self._clock()
        with self._lock:
            due = [(k, e) for k, e in self._entries.items() if e.due <= now]
            for key, entry in due:  # the next run; the work may change or drop the entry meanwhile
                self._entries[key] = replace(entry, due=now + self._intervals[entry.task])
        return due

    def run_due(self, work: Work) -> int:
        """Run `work` for every entry that is due; errors are logged (the next run retries). Returns the count."""
        due = self._take_due()
        for key, entry in due:
            try:
                work(key, entry)
            except Exception as e:  # noqa: BLE001 - one resource's failure must not stop the others
                logger.warning("%s of %s/%s failed (retried in %.0f s): %s", entry.task, key[0], key[1],
                               self._intervals[entry.task], e)
        return len(due)

    def _sleep_seconds(self) -> float:
        with self._lock:
            nearest = min((e.due for e in self._entries.values()), default=None)
        if nearest is None:
            return MAX_SLEEP
        return min(max(nearest - self._clock(), 0.0), MAX_SLEEP)

    def start(self, work: Work) -> None:
        """Work off the schedule in a daemon thread until `stop`."""

        def loop() -> None:
            while not self._stop.is_set():
                self.run_due(work)
                self._wake.wait(self._sleep_seconds())
                self._wake.clear()

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="ms2mg-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
