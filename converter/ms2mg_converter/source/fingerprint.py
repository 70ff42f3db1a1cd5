"""The content fingerprint of the source files, for deciding that a rerun is "already converted".

Every checkpoint of one architecture has the same file sizes and, often, the same headers, so a rerun is
decided by content: the header's sha256 (read with the index) plus a digest of every byte of every file,
CRC-32 by default (zlib-ng, several GB/s per core) or sha256 (`--source-digest sha256`). The conversion
computes it on a background thread while it runs (plain sequential reads, mostly from the page cache the
conversion has just filled); a rerun recomputes it only when everything else already matches.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from zlib_ng import zlib_ng

from ms2mg_converter.config import SourceDigest
from ms2mg_converter.source.index import SourceIndex

BLOCK = 8 * 1024 * 1024


class SourceFileDigest(BaseModel):
    """One source file as the manifest records it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    bytes: int
    header_sha256: str = ""
    digest: str = ""
    """`<kind>:<hex>` of the whole file, e.g. `crc32:1a2b3c4d`; empty in manifests written before 0.2."""


def file_digest(path: Path, kind: SourceDigest) -> str:
    """`<kind>:<hex>` of every byte of the file (read in 8 MiB blocks; both hashes release the GIL)."""
    with path.open("rb") as f:
        if kind is SourceDigest.SHA256:
            h = hashlib.sha256()
            while block := f.read(BLOCK):
                h.update(block)
            return f"sha256:{h.hexdigest()}"
        crc = 0
        while block := f.read(BLOCK):
            crc = zlib_ng.crc32(block, crc)
        return f"crc32:{crc:08x}"


class SourceFingerprint:
    """The digests of every source file, computed on one background thread from the moment this is made."""

    def __init__(self, index: SourceIndex, kind: SourceDigest) -> None:
        self._index = index
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ms2mg-source-digest")
        self._digests: list[Future[str]] = [self._pool.submit(file_digest, f.path, kind) for f in index.files]

    def result(self) -> list[SourceFileDigest]:
        """Wait for the digests (raises the OSError of a file that could not be read)."""
        try:
            return [SourceFileDigest(path=str(f.path), bytes=f.size, header_sha256=f.header_sha256,
                                     digest=d.result()) for f, d in zip(self._index.files, self._digests, strict=True)]
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def cancel(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def headers_match(recorded: list[SourceFileDigest], index: SourceIndex) -> bool:
    """Same files, sizes and headers as recorded (cheap: no file content is read)."""
    return [(r.path, r.bytes, r.header_sha256) for r in recorded] == [
        (str(f.path), f.size, f.header_sha256) for f in index.files]


def content_matches(recorded: list[SourceFileDigest], index: SourceIndex, kind: SourceDigest) -> bool:
    """Every recorded digest (of kind `kind`) equals the file's digest now (reads every source byte)."""
    if not headers_match(recorded, index) or any(not r.digest.startswith(f"{kind}:") for r in recorded):
        return False
    return all(file_digest(f.path, kind) == r.digest for f, r in zip(index.files, recorded, strict=True))
