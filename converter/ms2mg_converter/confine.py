"""Keeping reads and writes inside given directories, symlinks included (`--load-root`, `--save-root`).

In a Kubernetes Job the source and destination are volumes that users fill themselves, so a symlink on
them could point anywhere in the container. With roots given (the operator passes the two mount points),
every path is resolved (`realpath`) and must stay inside its root: the source directory and each file
before it is opened, and each file again by its open descriptor (`/proc/self/fd`), so swapping a file for
a link between the check and the read does not help; the destination and its parent before anything is
created, and again just before the finished checkpoint is moved into place. Links that stay inside the
root are fine.
"""

from __future__ import annotations

import os
from pathlib import Path

from ms2mg_converter.errors import DestinationError, SourceError


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when `path`, with every symlink resolved, is `root` or below it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def check_source_path(path: Path, root: Path | None, what: str = "source") -> None:
    if root is not None and not inside(path, root):
        raise SourceError(f"{what} {path} resolves to {os.path.realpath(path)}, outside --load-root {root} "
                          "(a symlink leaving the source volume?); ms2mg reads only inside it.")


def check_open_file(fd: int, path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> None:
    """The file behind an open descriptor must be inside `root` (checked after opening: no race)."""
    if root is None:
        return
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = os.path.realpath(path)
    if not inside(real, root):
        raise SourceError(f"{path} resolves to {real}, outside --load-root {root} (a symlink leaving the "
                          "source volume?); ms2mg reads only inside it.")


def check_destination(save_dir: Path, root: Path | None) -> None:
    """`save_dir` must not be a symlink and must resolve inside `root` (before anything is created)."""
    if root is None:
        return
    if save_dir.is_symlink():
        raise DestinationError(f"--save-dir {save_dir} is a symbolic link; with --save-root ms2mg writes only "
                               "to real directories inside the destination volume.")
    if not inside(save_dir, root):
        raise DestinationError(f"--save-dir {save_dir} resolves to {os.path.realpath(save_dir)}, outside "
                               f"--save-root {root} (a symlink leaving the destination volume?); ms2mg writes "
                               "only inside it.")
