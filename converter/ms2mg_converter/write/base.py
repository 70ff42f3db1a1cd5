"""The `Writer` interface: one output format, chosen by `--ckpt-format`, written into a staging directory.

A writer gets the complete plan and an empty directory and writes every file the format needs there
(checkpoint files and the tracker file). It reports each data file it wrote with its size and the sha256
computed while writing; staging, verification, the manifest and the commit are the caller's
(`run.execute`), the same for every format. Adding a format = a module in this package with a `Writer`
subclass registered with `@register`, and a `CkptFormat` value in `config` (see docs/adding-an-output-format.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from ms2mg_converter.config import CkptFormat
from ms2mg_converter.plan import Plan
from ms2mg_converter.write.filewriter import WrittenFile

ProgressFn = Callable[[int, int, int], None]
"""progress(done_groups, total_groups, bytes_written)."""


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
