"""Stream: one output tensor's bytes, chunk by chunk, from memory-mapped source rows (numpy + ml_dtypes).

Public names: `produce`, `BufferPool`, `FiniteCheck`, `SourceWindow`, `WriterStopped`.
"""

from ms2mg_converter.stream.reader import BufferPool, FiniteCheck, SourceWindow, WriterStopped, produce

__all__ = ["BufferPool", "FiniteCheck", "SourceWindow", "WriterStopped", "produce"]
