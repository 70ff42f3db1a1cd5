"""Writing a rank file with O_DIRECT: the bytes go from our buffers to the disk, not through the page cache.

On the machines measured (docs/performance.md) writing 2 GB through the page cache and fsync'ing it cost
1.6-4.8 CPU seconds in the kernel, and varied a lot; with O_DIRECT the same write costs about 0.5 s (one
copy into an aligned buffer) and runs at the disk's speed. `DirectFile` keeps that invisible to the zip
writer: it has `write()`, and `close()` fsyncs. Bytes are gathered in page-aligned buffers (`BLOCK`-sized
writes at `BLOCK`-aligned offsets, as O_DIRECT requires), written by a small I/O thread while the next
buffer fills; the last, partial block is written padded and the file is then truncated to its true size.

`open_output()` falls back to an ordinary buffered file (`BufferedFile`, which starts the kernel's
writeback every 32 MiB) where O_DIRECT is not supported (tmpfs, some network file systems) or when
`MS2MG_DIRECT_IO=0`. Both kinds are fsync'ed before the checkpoint is committed: `DirectFile.close()`
does it at once (cheap: the data is already on disk), `BufferedFile.sync()` at the end of the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Any, BinaryIO

BLOCK = 4096
BUFFER_BYTES = 8 * 1024 * 1024
"""Size of each of the two aligned buffers (a multiple of BLOCK)."""


class DirectFile:
    """A sequential, write-only file written with O_DIRECT from two page-aligned buffers."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path
        self._buffers = [mmap.mmap(-1, BUFFER_BYTES) for _ in range(2)]
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for b in self._buffers[1:]:
            self._free.put(b)
        self._buf, self._fill, self._size = self._buffers[0], 0, 0
        self._todo: queue.Queue[tuple[mmap.mmap, int] | None] = queue.Queue()
        self._error: OSError | None = None
        self._io = threading.Thread(target=self._write_loop, name="ms2mg-direct-io", daemon=True)
        self._io.start()

    def _write_loop(self) -> None:
        while (item := self._todo.get()) is not None:
            buf, length = item
            try:
                if self._error is None:
                    with memoryview(buf) as whole, whole[:length] as view:
                        done = 0
                        while done < length:
                            done += os.write(self.fd, view[done:])
            except OSError as e:
                self._error = e
            self._free.put(buf)

    def _check(self) -> None:
        if self._error is not None:
            raise OSError(self._error.errno, self._error.strerror, str(self.path))

    def write(self, data: bytes | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        n, pos = len(view), 0
        while pos < n:
            take = min(n - pos, BUFFER_BYTES - self._fill)
            self._buf[self._fill: self._fill + take] = view[pos: pos + take]
            self._fill += take
            pos += take
            if self._fill == BUFFER_BYTES:
                self._submit(BUFFER_BYTES)
        self._size += n
        return n

    def _submit(self, length: int) -> None:
        self._check()
        self._todo.put((self._buf, length))
        self._buf, self._fill = self._free.get(), 0

    def sync(self) -> None:
        """Nothing left to do: `close()` already wrote, truncated and fsync'ed the file."""

    def close(self) -> None:
        """Write the rest (padded to a block), cut the padding off, fsync, close."""
        try:
            if self._fill:
                padded = -(-self._fill // BLOCK) * BLOCK
                self._buf[self._fill: padded] = bytes(padded - self._fill)
                self._submit(padded)
            self._todo.put(None)
            self._io.join()
            self._check()
            os.ftruncate(self.fd, self._size)
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self._io.is_alive():
            self._error = self._error or OSError(0, "aborted")
            self._todo.put(None)
            self._io.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for b in self._buffers:
            with contextlib.suppress(BufferError):  # still referenced: freed with its last view
                b.close()


WRITEBACK_BYTES = 32 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing [offset, offset+length) to disk now, without waiting (Linux only)."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class BufferedFile:
    """The fallback: an ordinary buffered file. Every `WRITEBACK_BYTES` the kernel is asked to start writing
    the new pages (`sync_file_range`), so the final `sync()` mostly waits for what is in flight."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._pos = self._kicked = 0

    def write(self, data: bytes | memoryview, /) -> int:
        n = self._f.write(data)
        self._pos += n
        if self._pos - self._kicked >= WRITEBACK_BYTES:
            self._kick()
        return n

    def _kick(self) -> None:
        self._f.flush()
        start_writeback(self._f.fileno(), self._kicked, self._pos - self._kicked)
        self._kicked = self._pos

    def close(self) -> None:
        self._kick()

    def sync(self) -> None:
        try:
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def abort(self) -> None:
        self._f.close()


def _probe_direct(fd: int) -> bool:
    """Some file systems accept O_DIRECT at open and refuse the first write: try one block."""
    block = mmap.mmap(-1, BLOCK)
    try:
        os.write(fd, block)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        block.close()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return True


def open_output(path: Path) -> DirectFile | BufferedFile:
    """A new file at `path` (it must not exist), written with O_DIRECT where the file system allows it."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct and os.environ.get("MS2MG_DIRECT_IO", "1") != "0":
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | direct, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: the file system has no O_DIRECT
                raise
        else:
            try:
                usable = _probe_direct(fd)
            except BaseException:
                os.close(fd)
                raise
            if usable:
                return DirectFile(fd, path)
            os.close(fd)
            return BufferedFile(open(path, "wb"))
    return BufferedFile(open(path, "xb"))
