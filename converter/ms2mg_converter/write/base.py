"""The `Writer` interface: one output format, chosen by `--ckpt-format`, written into a staging directory.

A writer gets the complete plan and an empty directory and writes every file the format needs there
(checkpoint files and the tracker file). It reports each data file it wrote with its size and the sha256
computed while writing; staging, verification, the manifest and the commit are the caller's
(`run.execute`), the same for every format. Adding a format = a module in this package with a `Writer`
subclass registered with `@register`, and a `CkptFormat` value in `config` (see docs/adding-an-output-format.md).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from ms2mg_converter.config import CkptFormat
from ms2mg_converter.plan import Plan
from ms2mg_converter.stream.reader import BufferPool, FiniteCheck
from ms2mg_converter.write.filewriter import WrittenFile

ProgressFn = Callable[[int, int, int], None]
"""progress(done_groups, total_groups, bytes_written)."""

CHUNK_BYTES = 16 * 1024 * 1024
"""Size of one buffer of the chunk pool that carries tensor bytes from the reader to the writer thread."""
POOL_BUFFERS = 4


def write_synced(path: Path, data: bytes) -> None:
    """A small file (tracker, metadata) written whole and fsynced before the staging directory is committed."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class StreamingRun:
    """A streaming writer's state for one conversion: the chunk pool, the finite check and the progress counters."""

    def __init__(self, plan: Plan, root: Path, progress: ProgressFn) -> None:
        self.plan, self.root, self.progress = plan, root, progress
        self.abort = threading.Event()
        self.pool = BufferPool(plan.config.dtype, CHUNK_BYTES, POOL_BUFFERS, self.abort)
        self.check = None if plan.config.allow_nonfinite else FiniteCheck(plan.config.dtype)
        self.done = 0
        self.bytes = 0


class Writer(ABC):
    format: ClassVar[CkptFormat]

    @abstractmethod
    def write(self, plan: Plan, root: Path, progress: ProgressFn) -> list[WrittenFile]:
        """Write the whole checkpoint of `plan` under `root` (an empty staging directory).

        Returns the data files written, in the order of `plan.files`; raises `ConversionError`s or OSError."""


_WRITERS: dict[CkptFormat, type[Writer]] = {}
W = TypeVar("W", bound=type[Writer])


def register(cls: W) -> W:
    """Class decorator: the writer of `cls.format` (one per format)."""
    if cls.format in _WRITERS:
        raise ValueError(f"a writer for --ckpt-format {cls.format} is registered twice")
    _WRITERS[cls.format] = cls
    return cls


def writer_for(fmt: CkptFormat) -> Writer:
    try:
        return _WRITERS[fmt]()
    except KeyError:
        raise ValueError(f"no writer for --ckpt-format {fmt}") from None
