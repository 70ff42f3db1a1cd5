"""Writing rank files on background threads, so casting, writing and hashing overlap.

    main thread ──cmds──► writer thread ──bytes──► hasher thread
    (map, cast, check)    (write, CRC-32,          (sha256; returns chunk buffers)
                           start writeback)

The writer owns the open file and its `ZipStreamWriter`; everything it writes goes on to the hasher in
file order, and a chunk buffer goes back to the pool only after it has been written *and* hashed. Every
`WRITEBACK_BYTES` the writer asks the kernel to start writing the new pages to disk (`sync_file_range`,
asynchronous), so the disk works while the CPUs cast and hash; `finish()` then fsyncs every file, which
only waits for what is still in flight. Any error on either thread is re-raised in the main thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ms2mg_converter.reader import Array, BufferPool
from ms2mg_converter.zipwriter import ZipStreamWriter

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


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    bytes: int
    sha256: str


class _Stage:
    """A thread draining a bounded queue; errors are kept for the main thread."""

    def __init__(self, name: str, abort: threading.Event, depth: int) -> None:
        self.queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=depth)
        self.abort = abort
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def put(self, *msg: Any) -> None:
        while not self.abort.is_set():
            try:
                self.queue.put(msg, timeout=0.2)
                return
            except queue.Full:
                continue

    def _loop(self) -> None:
        try:
            while not self.abort.is_set():
                try:
                    msg = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                if msg[0] == "stop":
                    return
                self.handle(msg)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
            self.abort.set()
        finally:
            self.cleanup()

    def handle(self, msg: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        return None


class _Hasher(_Stage):
    def __init__(self, pool: BufferPool, abort: threading.Event) -> None:
        super().__init__("ms2mg-hasher", abort, depth=8)
        self.pool = pool
        self.sha = hashlib.sha256()
        self.written: list[WrittenFile] = []
        self.pending: list[BinaryIO] = []

    def handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "data":
            self.sha.update(msg[1])
        elif kind == "release":
            self.pool.put(msg[1])
        elif kind == "done":
            path, size = msg[1], msg[2]
            self.written.append(WrittenFile(path, size, self.sha.hexdigest()))
            self.sha = hashlib.sha256()


class _Writer(_Stage):
    def __init__(self, hasher: _Hasher, abort: threading.Event) -> None:
        super().__init__("ms2mg-writer", abort, depth=2)
        self.hasher = hasher
        self.file: BinaryIO | None = None
        self.zip: ZipStreamWriter | None = None
        self.path: Path | None = None
        self.kicked = 0
        self.files: list[BinaryIO] = []
        """Every file opened, kept open until `finish()` fsyncs it (or a failure closes it)."""

    def handle(self, msg: tuple[Any, ...]) -> None:
        try:
            self._handle(msg)
        except OSError as e:
            if e.filename is None and self.path is not None:  # name the file in "disk full" and such
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            raise

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "open":
            self.path = msg[1]
            self.file = open(msg[1], "xb")  # noqa: SIM115 - closed after fsync in finish() or on failure
            self.files.append(self.file)
            self.zip = ZipStreamWriter(self.file, digest=lambda data: self.hasher.put("data", data))
            self.kicked = 0
            return
        z = self.zip
        assert z is not None
        if kind == "add":
            z.add(msg[1], msg[2])
        elif kind == "begin":
            z.begin(msg[1], msg[2])
        elif kind == "chunk":
            buf, elems = msg[1], msg[2]
            z.write(memoryview(buf[:elems].view(np.uint8)))
            self.hasher.put("release", buf)
            self._writeback(z)
        elif kind == "end":
            z.end()
        elif kind == "close":
            z.close()
            self._writeback(z, final=True)
            self.hasher.put("done", self.path, z.position)
            self.file = self.zip = None

    def _writeback(self, z: ZipStreamWriter, final: bool = False) -> None:
        if self.file is None or (z.position - self.kicked < WRITEBACK_BYTES and not final):
            return
        self.file.flush()
        start_writeback(self.file.fileno(), self.kicked, z.position - self.kicked)
        self.kicked = z.position

    def cleanup(self) -> None:
        if self.abort.is_set():
            for f in self.files:
                f.close()


class FileWriterThread:
    """The main thread's handle on the writer and hasher threads."""

    def __init__(self, pool: BufferPool, abort: threading.Event) -> None:
        self._abort = abort
        self._hasher = _Hasher(pool, abort)
        self._writer = _Writer(self._hasher, abort)
        self._hasher.thread.start()
        self._writer.thread.start()

    def raise_error(self) -> None:
        for stage in (self._writer, self._hasher):
            if stage.error is not None:
                raise stage.error

    def _send(self, *msg: Any) -> None:
        self.raise_error()
        self._writer.put(*msg)
        self.raise_error()

    def open(self, path: Path) -> None:
        self._send("open", path)

    def record(self, name: str, data: bytes) -> None:
        self._send("add", name, data)

    def begin(self, name: str, size: int) -> None:
        self._send("begin", name, size)

    def chunk(self, buf: Array, elems: int) -> None:
        self._send("chunk", buf, elems)

    def end(self) -> None:
        self._send("end")

    def close_file(self) -> None:
        self._send("close")

    def finish(self) -> list[WrittenFile]:
        """Wait until everything is written, hashed and fsync'ed; re-raise any thread's error."""
        self._send("stop")
        self._writer.thread.join()
        self.raise_error()
        self._hasher.put("stop")
        self._hasher.thread.join()
        self.raise_error()
        for f in self._writer.files:
            os.fsync(f.fileno())
            f.close()
        return self._hasher.written

    def shutdown(self) -> None:
        """Stop both threads after a failure (open files are closed)."""
        self._abort.set()
        self._writer.thread.join(timeout=30)
        self._hasher.thread.join(timeout=30)
        for f in self._writer.files:
            f.close()
