"""A streaming writer for the zip container that `torch.save` produces.

`torch.save` writes an uncompressed zip whose records start on 64-byte boundaries (padding goes into a
"FB" extra field), with general-purpose flag bit 3 set: the CRC-32 and sizes follow each record in a data
descriptor. That layout is append-only, so a record can be streamed chunk by chunk in constant memory while
the file's sha256 is computed on the fly. ZIP64 fields are used where sizes or offsets pass 4 GiB.
Reference: PKWARE APPNOTE 6.3.x §4.3; torch's caffe2 `PyTorchStreamWriter`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

try:  # zlib-ng's CRC-32 is SIMD (about 6x zlib's here); the checksum is the same
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - the converter extra installs zlib-ng
    from zlib import crc32

ALIGNMENT = 64
_LIMIT = 0xFFFFFFFF
"""Sizes and offsets from here on need ZIP64 fields (a module attribute so tests can lower it)."""
_MARK = 0xFFFFFFFF
"""The value a 32-bit field holds when the real value is in the ZIP64 extra field."""
_FLAGS = 0x0808  # bit 3: data descriptor; bit 11: UTF-8 names (as torch writes)


@dataclass
class _Record:
    name: bytes
    offset: int
    size: int
    crc: int = 0
    zip64: bool = False


Sink = Callable[[bytes | memoryview], object]


class Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...


class ZipStreamWriter:
    """Append-only zip writer; every byte written is also given to `digest` (by default a sha256 here).

    A caller that hashes on another thread passes its own `digest` callable; it must consume the bytes
    before the memory behind them is reused.
    """

    def __init__(self, out: Writable, digest: Sink | None = None) -> None:
        self._out = out
        self._pos = 0
        self._records: list[_Record] = []
        self._open: _Record | None = None
        self._written = 0
        self.sha256 = hashlib.sha256()
        self._digest: Sink = digest or self.sha256.update

    @property
    def position(self) -> int:
        return self._pos

    def _emit(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self._digest(data)
        self._pos += len(data)

    def begin(self, name: str, size: int) -> None:
        """Start a record of exactly `size` bytes, to be given with `write()` and closed with `end()`."""
        if self._open is not None:
            raise RuntimeError("a zip record is already open")
        rec = _Record(name.encode(), self._pos, size)
        rec.zip64 = size >= _LIMIT or self._pos >= _LIMIT
        z64 = struct.pack("<HHQQ", 1, 16, 0, 0) if rec.zip64 else b""
        fixed = 30 + len(rec.name) + len(z64) + 4
        pad = -(self._pos + fixed) % ALIGNMENT
        extra = z64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if rec.zip64 else 20, _FLAGS, 0, 0, 0, 0,
                             _MARK if rec.zip64 else 0, _MARK if rec.zip64 else 0, len(rec.name), len(extra))
        self._emit(header + rec.name + extra)
        self._open, self._written = rec, 0

    def write(self, data: bytes | memoryview) -> None:
        rec = self._open
        if rec is None:
            raise RuntimeError("no zip record is open")
        if self._written + len(data) > rec.size:
            raise RuntimeError(f"record {rec.name!r} got more than its {rec.size} bytes")
        self._written += len(data)
        rec.crc = crc32(data, rec.crc)
        self._emit(data)

    def end(self) -> None:
        rec = self._open
        if rec is None or self._written != rec.size:
            raise RuntimeError(f"record closed after {self._written} of its bytes")
        if rec.zip64:
            self._emit(struct.pack("<IIQQ", 0x08074B50, rec.crc, rec.size, rec.size))
        else:
            self._emit(struct.pack("<IIII", 0x08074B50, rec.crc, rec.size, rec.size))
        self._records.append(rec)
        self._open = None

    def add(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def _central_entry(self, rec: _Record) -> bytes:
        fields = []
        if rec.size >= _LIMIT:
            fields += [rec.size, rec.size]
        if rec.offset >= _LIMIT:
            fields.append(rec.offset)
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        big = rec.size >= _LIMIT
        version = 45 if fields or rec.zip64 else 20
        return struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, _FLAGS, 0, 0, 0, rec.crc,
            _MARK if big else rec.size, _MARK if big else rec.size, len(rec.name), len(extra), 0, 0, 0, 0,
            _MARK if rec.offset >= _LIMIT else rec.offset) + rec.name + extra

    def close(self) -> None:
        """Write the central directory (and ZIP64 end records when needed)."""
        if self._open is not None:
            raise RuntimeError("close() with a record still open")
        start = self._pos
        for rec in self._records:
            self._emit(self._central_entry(rec))
        size, count = self._pos - start, len(self._records)
        if start >= _LIMIT or size >= _LIMIT or count >= 0xFFFF:
            z64_at = self._pos
            self._emit(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, start))
            self._emit(struct.pack("<IIQI", 0x07064B50, 0, z64_at, 1))
            self._emit(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _MARK, _MARK, 0))
        else:
            self._emit(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, start, 0))
