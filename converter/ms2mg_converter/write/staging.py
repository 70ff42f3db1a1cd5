"""Atomic output: write into a staging directory beside the destination, then swap it into place.

* The staging directory `.<name>.ms2mg-staging-<id>` lives in the destination's parent (same file
  system, so the final rename is atomic) and holds a lock file flock'ed for the whole run, commit
  included: the lock moves with the directory and is removed only once the directory is in place, so
  no other run can take a committing directory for a stale one.
* Commit: everything is fsync'ed (files, directories), then `rename(2)` when the destination does not
  exist or is an empty directory (a directory that appeared meanwhile is refused, never replaced); with
  `--overwrite` of an earlier ms2mg checkpoint (checked again at commit time), `renameat2(RENAME_EXCHANGE)`
  swaps both directories atomically and the old checkpoint (now at the staging name) is deleted
  afterwards. At every instant the destination is either absent or a complete checkpoint.
* Where the file system lacks RENAME_EXCHANGE the old checkpoint is first renamed to
  `.<name>.ms2mg-old-<id>`; for that instant the destination is absent. A run killed there leaves the old
  checkpoint under that name: the next run to the same destination puts it back (or, when the new
  checkpoint did land and `--overwrite` is given again, deletes it) and says so. ms2mg never deletes it
  silently.
* A run killed with SIGKILL leaves its staging directory behind; the next run finds it (its lock is no
  longer held), deletes it and reports it.
* SIGTERM/SIGINT stop a run until its commit begins; from then on (`shielded()`) they are ignored, so a
  commit is never cut half-way and a committed checkpoint is reported as a success. The same shield
  covers the removal of a failed run's staging directory.
* ms2mg never deletes a directory it did not write: `--overwrite` replaces only an empty directory or one
  holding an `ms2mg-manifest.json`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path

from ms2mg_converter.confine import check_destination
from ms2mg_converter.errors import DestinationError, DestinationExistsError

MANIFEST = "ms2mg-manifest.json"
LOCK = ".ms2mg-lock"
_RENAME_EXCHANGE = 2

log = logging.getLogger("ms2mg")


class _Shield:
    active = False


def shielded() -> bool:
    """True while a commit (or the cleanup of a failed run) must not be interrupted by a signal."""
    return _Shield.active


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


def _fsync_path(path: Path, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_path(path, directory=True)


def _fsync_tree(root: Path) -> None:
    """fsync the manifest and every directory under `root`, deepest first (rank files are fsync'ed as written)."""
    if (root / MANIFEST).is_file():
        _fsync_path(root / MANIFEST, directory=False)
    dirs = [Path(d) for d, _, _ in os.walk(root)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)


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


def _new_name(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.ms2mg-{kind}-{uuid.uuid4().hex[:12]}"


class Staging:
    def __init__(self, dest: Path, overwrite: bool, root: Path | None = None) -> None:
        self.dest = dest.absolute()
        self.overwrite = overwrite
        self.root = root
        self.path = _new_name(self.dest, "staging")
        self._lock_fd: int | None = None
        _Shield.active = False

    def check_destination(self) -> None:
        """Refuse a destination that must not be replaced (before any work is done).

        First repairs what an earlier run killed during its commit may have left (see `recover`)."""
        self.recover()
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

    def _siblings(self, kind: str) -> list[Path]:
        parent = self.dest.parent
        if not parent.is_dir():
            return []
        return sorted(p for p in parent.glob(f".{self.dest.name}.ms2mg-{kind}-*") if p.is_dir())

    def recover(self) -> list[Path]:
        """Undo what a run killed inside the fallback commit left (`.<name>.ms2mg-old-*`); returns them.

        Nothing is touched while another run holds a staging lock for this destination (it may be
        committing right now). The destination missing: the newest complete old checkpoint is put back.
        The destination complete and `--overwrite` given: the old checkpoints it replaced are deleted.
        Otherwise they are left and reported. A lock file left in the destination by a run killed just
        after its rename is removed.
        """
        d = self.dest
        olds = self._siblings("old")
        stray_lock = d / LOCK
        if not olds and not stray_lock.exists():
            return []
        if any(_is_locked(p) for p in self._siblings("staging")):
            return []
        with contextlib.suppress(OSError):
            if stray_lock.is_file() and not _is_locked(d):
                stray_lock.unlink()
        handled: list[Path] = []
        try:
            complete = [p for p in olds if (p / MANIFEST).is_file()]
            if not d.exists() and complete:
                newest = max(complete, key=lambda p: p.stat().st_mtime)
                os.rename(newest, d)
                log.warning("restored the checkpoint %s to --save-dir %s: an earlier --overwrite run was stopped "
                            "while it replaced it", newest, d)
                handled.append(newest)
                olds.remove(newest)
            if olds and (d / MANIFEST).is_file() and self.overwrite:
                for p in olds:
                    shutil.rmtree(p)
                    log.warning("removed %s: the earlier checkpoint that an interrupted --overwrite run had "
                                "already replaced at --save-dir %s", p, d)
                    handled.append(p)
            elif olds:
                log.warning("found %s beside --save-dir %s: a checkpoint an interrupted --overwrite run moved "
                            "aside. ms2mg leaves it; check --save-dir, then delete it (or rerun with --overwrite)",
                            ", ".join(map(str, olds)), d)
        except OSError as e:
            log.warning("could not repair what an interrupted run left beside --save-dir %s (%s); left as it is",
                        d, e.strerror or e)
        return handled

    def tidy(self) -> list[Path]:
        """Repair what interrupted runs left (`recover`) and remove their stale staging directories."""
        handled = self.recover()
        for p in self.stale():
            shutil.rmtree(p, ignore_errors=True)
            handled.append(p)
        return handled

    def stale(self) -> list[Path]:
        """Staging directories of earlier runs that died (their lock is free)."""
        return [p for p in self._siblings("staging") if not _is_locked(p)]

    def create(self) -> list[Path]:
        """Create the destination's parent and the locked staging directory; remove stale ones."""
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            removed = self.stale()
            for p in removed:
                shutil.rmtree(p, ignore_errors=True)
            for attempt in range(3):
                try:
                    self.path.mkdir()
                    fd = os.open(self.path / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
                    break
                except FileNotFoundError:  # another run took the fresh directory for a stale one
                    if attempt == 2:
                        raise
                    self.path = _new_name(self.dest, "staging")
            self._lock_fd = fd
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.abort()
            raise DestinationError(f"cannot create the staging directory beside --save-dir {self.dest} "
                                   f"({e.strerror or e}); the destination must be on a writable file "
                                   "system.") from e
        except BaseException:
            self.abort()
            raise
        return removed

    def commit(self) -> None:
        """Move the finished checkpoint into place atomically (signals are ignored from here on)."""
        _Shield.active = True
        _fsync_tree(self.path)
        d = self.dest
        check_destination(d, self.root)  # again: a directory on the path may have become a link meanwhile
        if self.overwrite and d.is_dir() and any(d.iterdir()):
            self.check_destination()  # again: the destination may have changed during the run
            if not _renameat2_exchange(self.path, d):
                self._swap_by_renames()
        else:
            try:
                os.rename(self.path, d)  # replaces an empty directory, refuses anything else
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise DestinationExistsError(f"--save-dir {d} was created by someone else while ms2mg was "
                                             "converting, and is not empty; it was left untouched and the new "
                                             "checkpoint discarded. Choose another directory.") from e
        try:  # the checkpoint is in place: what follows is tidying, and cannot undo the success
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / LOCK)
            shutil.rmtree(self.path, ignore_errors=True)
            _fsync_dir(d.parent)
        except OSError as e:
            log.warning("the checkpoint is in place at --save-dir %s, but tidying up after it failed: %s", d,
                        e.strerror or e)
        self._release()

    def _swap_by_renames(self) -> None:
        d = self.dest
        old = _new_name(d, "old")
        os.rename(d, old)
        try:
            os.rename(self.path, d)
        except OSError:
            os.rename(old, d)  # put the user's checkpoint back
            raise
        self.path = old

    def abort(self) -> None:
        shield, _Shield.active = _Shield.active, True
        try:
            shutil.rmtree(self.path, ignore_errors=True)
            self._release()
        finally:
            _Shield.active = shield

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
