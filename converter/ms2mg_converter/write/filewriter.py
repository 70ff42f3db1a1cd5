"""Writing rank files on background threads, so casting, writing and hashing overlap.

    main thread ──cmds──► writer thread ──bytes──► hasher thread
    (map, cast, check)    (zip records, CRC-32,    (sha256; returns chunk buffers)
                           O_DIRECT via directio)

The writer owns the open file (`directio.open_output`: O_DIRECT where possible) and its
`ZipStreamWriter`; everything it writes goes on to the hasher in file order, and a chunk buffer goes back
to the pool only after it has been written *and* hashed. `finish()` makes sure every file is on disk
(fsync). Any error on either thread is re-raised in the main thread.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ms2mg_converter.stream.reader import Array, BufferPool
from ms2mg_converter.write.directio import BufferedFile, DirectFile, open_output
from ms2mg_converter.write.zipwriter import ZipStreamWriter


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
        self.file: DirectFile | BufferedFile | None = None
        self.zip: ZipStreamWriter | None = None
        self.path: Path | None = None
        self.files: list[DirectFile | BufferedFile] = []
        """Every file opened: `finish()` syncs them (or a failure closes them)."""
        self.base = 0
        """Segmented files: where the current segment starts."""
        self.segments: dict[Path, list[tuple[int, int]]] = {}
        """Segmented files (`open_segmented`): (offset, length) of every segment, in file order."""

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
            self.file = open_output(msg[1])
            self.files.append(self.file)
            self.zip = ZipStreamWriter(self.file, digest=lambda data: self.hasher.put("data", data))
            return
        if kind in ("segmented", "archive", "raw", "archive_end") or self.path in self.segments:
            self._segment(msg)
            return
        z = self.zip
        assert z is not None
        if kind == "close":
            z.close()
            assert self.file is not None
            self.file.close()
            self.hasher.put("done", self.path, z.position)
            self.file = self.zip = None
        else:
            self._handle_record(msg)

    def _segment(self, msg: tuple[Any, ...]) -> None:
        """A file made of segments: zip archives (one `torch.save` each) and raw byte strings, back to back."""
        kind = msg[0]
        if kind == "segmented":
            self.path, self.base, self.zip = msg[1], 0, None
            self.file = open_output(msg[1])
            self.files.append(self.file)
            self.segments[msg[1]] = []
            return
        assert self.file is not None
        assert self.path is not None
        if kind == "archive":
            self.zip = ZipStreamWriter(self.file, digest=lambda data: self.hasher.put("data", data))
        elif kind == "raw":
            self.file.write(msg[1])
            self.hasher.put("data", msg[1])
            self._end_segment(len(msg[1]))
        elif kind == "archive_end":
            assert self.zip is not None
            self.zip.close()
            self._end_segment(self.zip.position)
            self.zip = None
        elif kind == "close":
            self.file.close()
            self.hasher.put("done", self.path, self.base)
            self.file = None
        else:
            self._handle_record(msg)

    def _end_segment(self, length: int) -> None:
        assert self.path is not None
        self.segments[self.path].append((self.base, length))
        self.base += length

    def _handle_record(self, msg: tuple[Any, ...]) -> None:
        """A record of the zip archive being written: an entry added whole, or begun, streamed and ended."""
        z = self.zip
        assert z is not None
        kind = msg[0]
        if kind == "add":
            z.add(msg[1], msg[2])
        elif kind == "begin":
            z.begin(msg[1], msg[2])
        elif kind == "chunk":
            buf, elems = msg[1], msg[2]
            z.write(memoryview(buf[:elems].view(np.uint8)))
            self.hasher.put("release", buf)
        elif kind == "end":
            z.end()

    def cleanup(self) -> None:
        if self.abort.is_set():
            for f in self.files:
                f.abort()


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

    def open_segmented(self, path: Path) -> None:
        """Open a file of segments: `archive()` ... `archive_end()` (a zip written with `record`/`begin`/
        `chunk`/`end`) or `raw()`; `segments(path)` gives their (offset, length) after `finish()`."""
        self._send("segmented", path)

    def archive(self) -> None:
        self._send("archive")

    def archive_end(self) -> None:
        self._send("archive_end")

    def raw(self, data: bytes) -> None:
        self._send("raw", data)

    def segments(self, path: Path) -> list[tuple[int, int]]:
        return self._writer.segments[path]

    def finish(self) -> list[WrittenFile]:
        """Wait until everything is written, hashed and fsync'ed; re-raise any thread's error."""
        self._send("stop")
        self._writer.thread.join()
        self.raise_error()
        self._hasher.put("stop")
        self._hasher.thread.join()
        self.raise_error()
        for f in self._writer.files:
            f.sync()
        return self._hasher.written

    def shutdown(self) -> None:
        """Stop both threads after a failure (open files are closed)."""
        self._abort.set()
        self._writer.thread.join(timeout=30)
        self._hasher.thread.join(timeout=30)
        for f in self._writer.files:
            f.abort()
