"""Progress reporting (a bar on a terminal, JSON lines for the operator, or nothing) and lines on stdout."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from ms2mg_converter.result import ProgressEvent


def say(text: str, out: TextIO | None = None) -> None:
    """Write a line to stdout (or `out`). A reader that went away (`ms2mg verify ... | head -1`) is not an
    error of the conversion: the rest of that stream goes to /dev/null and the work goes on."""
    stream = out or sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class JsonProgress:
    """One `{"done": n, "total": m, "bytes": b}` line per finished tensor group, on stdout."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def __call__(self, done: int, total: int, nbytes: int) -> None:
        say(ProgressEvent(done=done, total=total, bytes=nbytes).model_dump_json(), self.out)


class BarProgress:
    """A single self-overwriting line on stderr, at most 10 updates a second."""

    def __init__(self, out: TextIO | None = None, width: int = 30) -> None:
        self.out = out or sys.stderr
        self.width = width
        self.t0 = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int, total: int, nbytes: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        filled = self.width * done // max(total, 1)
        rate = nbytes / max(now - self.t0, 1e-9) / 1e6
        self.out.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} groups "
                       f"{nbytes / 1e9:.2f} GB {rate:.0f} MB/s")
        if done >= total:
            self.out.write("\n")
        self.out.flush()


def no_progress(done: int, total: int, nbytes: int) -> None:
    return None


def make_progress(mode: str) -> JsonProgress | BarProgress | None:
    if mode == "json":
        return JsonProgress()
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return BarProgress()
    return None
