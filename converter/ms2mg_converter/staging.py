"""Atomic output: write into a staging directory beside the destination, then swap it into place.

* The staging directory `.<name>.ms2mg-staging-<id>` lives in the destination's parent (same file
  system, so the final rename is atomic) and holds a lock file flock'ed for the whole run.
* Commit: `rename(2)` when the destination does not exist (or is an empty directory); with `--overwrite`
  of an earlier ms2mg checkpoint, `renameat2(RENAME_EXCHANGE)` swaps both directories atomically, and the
  old checkpoint (now at the staging name) is deleted afterwards. At every instant the destination is
  either absent or a complete checkpoint.
* A run killed with SIGKILL leaves its staging directory behind; the next run finds it (its lock is no
  longer held), deletes it and reports it.
* ms2mg never deletes a directory it did not write: `--overwrite` replaces only an empty directory or one
  holding an `ms2mg-manifest.json`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import uuid
from pathlib import Path

from ms2mg_converter.errors import DestinationError, DestinationExistsError

MANIFEST = "ms2mg-manifest.json"
LOCK = ".ms2mg-lock"
_RENAME_EXCHANGE = 2


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux >= 3.15). False when the system or file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_locked(directory: Path) -> bool:
    try:
        fd = os.open(directory / LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class Staging:
    def __init__(self, dest: Path, overwrite: bool) -> None:
        self.dest = dest.absolute()
        self.overwrite = overwrite
        self.path = self.dest.parent / f".{self.dest.name}.ms2mg-staging-{uuid.uuid4().hex[:12]}"
        self._lock_fd: int | None = None

    def check_destination(self) -> None:
        """Refuse a destination that must not be replaced (before any work is done)."""
        d = self.dest
        if d.exists() and not d.is_dir():
            raise DestinationError(f"--save-dir {d} exists and is not a directory; choose another path.")
        if d.is_dir() and any(d.iterdir()):
            if not self.overwrite:
                raise DestinationExistsError(f"--save-dir {d} exists and is not empty; ms2mg does not write "
                                             "into it. Choose a new directory, or pass --overwrite to replace "
                                             "an earlier ms2mg output.")
            if not (d / MANIFEST).is_file():
                raise DestinationExistsError(f"--save-dir {d} is not empty and holds no {MANIFEST}, so it was "
                                             "not written by ms2mg; --overwrite only replaces ms2mg outputs. "
                                             "Move its contents away or choose another directory.")

    def stale(self) -> list[Path]:
        """Staging directories of earlier runs that died (their lock is free)."""
        pattern = f".{self.dest.name}.ms2mg-staging-*"
        if not self.dest.parent.is_dir():
            return []
        return [p for p in self.dest.parent.glob(pattern) if p.is_dir() and not _is_locked(p)]

    def create(self) -> list[Path]:
        """Create the destination's parent and the locked staging directory; remove stale ones."""
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            removed = self.stale()
            for p in removed:
                shutil.rmtree(p, ignore_errors=True)
            self.path.mkdir()
            self._lock_fd = os.open(self.path / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise DestinationError(f"cannot create the staging directory beside --save-dir {self.dest} "
                                   f"({e.strerror or e}); the destination must be on a writable file "
                                   "system.") from e
        return removed

    def commit(self) -> None:
        """Move the finished checkpoint into place atomically."""
        os.unlink(self.path / LOCK)
        _fsync_dir(self.path)
        d = self.dest
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
        if not d.exists():
            os.rename(self.path, d)
        elif not _renameat2_exchange(self.path, d):
            old = d.parent / f".{d.name}.ms2mg-old-{uuid.uuid4().hex[:12]}"
            os.rename(d, old)
            os.rename(self.path, d)
            self.path = old
        shutil.rmtree(self.path, ignore_errors=True)
        _fsync_dir(d.parent)
        self._release()

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
