"""The poller's schedule, driven by a fake clock (no sleeping, no thread), and its thread's start/stop."""

from __future__ import annotations

import threading

from ms2mg_operator.poller import Entry, Key, Poller, Task

A, B, C = ("ns", "a"), ("ns", "b"), ("other", "c")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Poller, Clock, list[tuple[Key, Entry]]]:
    clock = Clock()
    return Poller({Task.PROGRESS: 15.0, Task.RECHECK: 30.0}, clock), clock, []


def test_entries_run_at_their_interval() -> None:
    poller, clock, ran = make()
    poller.want(A, Task.PROGRESS, "uid-a", pod="pod-a")
    poller.want(B, Task.RECHECK, "uid-b")
    assert poller.run_due(lambda k, e: ran.append((k, e))) == 0  # nothing due at once
    clock.now += 15
    poller.run_due(lambda k, e: ran.append((k, e)))
    assert [(k, e.task, e.pod) for k, e in ran] == [(A, Task.PROGRESS, "pod-a")]
    clock.now += 15
    ran.clear()
    poller.run_due(lambda k, e: ran.append((k, e)))
    assert sorted(k for k, _ in ran) == [A, B]


def test_want_keeps_the_due_time_of_an_unchanged_entry() -> None:
    poller, clock, ran = make()
    poller.want(A, Task.PROGRESS, "uid-a", pod="pod-a")
    clock.now += 10
    poller.want(A, Task.PROGRESS, "uid-a", pod="pod-a")  # every pod event says the same: no postponing
    poller.want(A, Task.PROGRESS, "uid-a")  # no pod named: the scheduled one stays
    clock.now += 5
    assert poller.run_due(lambda k, e: ran.append((k, e))) == 1
    assert ran[0][1].pod == "pod-a"


def test_a_new_pod_or_task_replaces_the_entry() -> None:
    poller, _, _ = make()
    poller.want(A, Task.PROGRESS, "uid-a", pod="pod-1")
    poller.want(A, Task.PROGRESS, "uid-a", pod="pod-2")
    assert poller.scheduled()[A].pod == "pod-2"
    poller.want(A, Task.RECHECK, "uid-a")
    assert poller.scheduled()[A].task == Task.RECHECK
    poller.want(A, Task.PROGRESS, "uid-a")  # progress without a known pod: nothing to read
    assert A not in poller.scheduled()


def test_forget_and_kick() -> None:
    poller, _, ran = make()
    for key in (A, B, C):
        poller.want(key, Task.RECHECK, f"uid-{key[1]}")
    poller.want(B, Task.PROGRESS, "uid-b", pod="p")
    poller.forget(C)
    assert poller.kick("ns", Task.RECHECK) == 1  # only A: B is a progress entry now, C forgotten
    poller.run_due(lambda k, e: ran.append((k, e)))
    assert [k for k, _ in ran] == [A]
    assert set(poller.scheduled()) == {A, B}


def test_errors_are_logged_and_the_entry_stays() -> None:
    poller, clock, _ = make()
    poller.want(A, Task.RECHECK, "uid-a")
    clock.now += 30

    def fail(key: Key, entry: Entry) -> None:
        raise RuntimeError("API down")

    assert poller.run_due(fail) == 1
    assert A in poller.scheduled() and poller.scheduled()[A].due == clock.now + 30


def test_thread_runs_kicked_entries_and_stops() -> None:
    poller = Poller({Task.PROGRESS: 3600.0, Task.RECHECK: 3600.0})
    done = threading.Event()
    poller.start(lambda k, e: done.set())
    try:
        poller.want(A, Task.RECHECK, "uid-a")
        poller.kick("ns", Task.RECHECK)
        assert done.wait(30), "the poller thread did not run the kicked entry"
    finally:
        poller.stop()
    assert poller._thread is None
