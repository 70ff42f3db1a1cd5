"""Writing rank files on a background thread, so casting (main thread) overlaps with write + hashing.

The main thread sends commands through a bounded queue; the writer thread owns the open file and its
`ZipStreamWriter` (CRC-32 per record, sha256 of the whole file, both computed while writing), and hands
chunk buffers back to the pool. Any OS error is kept and re-raised in the main thread at the next command.
Each file is flushed and fsync'ed before it counts as written.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ms2mg_converter.reader import Array, BufferPool
from ms2mg_converter.zipwriter import ZipStreamWriter


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    bytes: int
    sha256: str


class FileWriterThread:
    def __init__(self, pool: BufferPool, abort: threading.Event, depth: int = 2) -> None:
        self._pool = pool
        self._abort = abort
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.written: list[WrittenFile] = []
        self._thread = threading.Thread(target=self._run, name="ms2mg-writer", daemon=True)
        self._thread.start()
        self._file: Any = None
        self._zip: ZipStreamWriter | None = None
        self._path: Path | None = None

    # -- called from the main thread -------------------------------------------------------------
    def _send(self, *msg: Any) -> None:
        while True:
            self.raise_error()
            try:
                self._queue.put(msg, timeout=0.2)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

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
        """Wait for every queued command; re-raise the writer's error if it had one."""
        self._send("stop")
        self._thread.join()
        self.raise_error()
        return self.written

    def shutdown(self) -> None:
        """Stop after a failure in the main thread (closes the open file, if any)."""
        self._abort.set()
        self._thread.join(timeout=30)

    # -- the writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._abort.is_set():
                try:
                    msg = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                if msg[0] == "stop":
                    return
                self._handle(msg)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self._error = e
            self._abort.set()
        finally:
            if self._file is not None:
                self._file.close()

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "open":
            self._path = msg[1]
            self._file = open(msg[1], "xb", buffering=1024 * 1024)  # noqa: SIM115 - closed in "close"
            self._zip = ZipStreamWriter(self._file)
            return
        z = self._zip
        assert z is not None
        if kind == "add":
            z.add(msg[1], msg[2])
        elif kind == "begin":
            z.begin(msg[1], msg[2])
        elif kind == "chunk":
            buf, elems = msg[1], msg[2]
            z.write(memoryview(buf[:elems].view(np.uint8)))
            self._pool.put(buf)
        elif kind == "end":
            z.end()
        elif kind == "close":
            self._close(z)

    def _close(self, z: ZipStreamWriter) -> None:
        z.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        assert self._path is not None
        self.written.append(WrittenFile(self._path, z.position, z.sha256.hexdigest()))
