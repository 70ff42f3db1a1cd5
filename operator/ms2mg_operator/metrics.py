"""Prometheus metrics of the operator, served on `/metrics` (prometheus_client).

Each operator instance owns its own `CollectorRegistry` (no module-global metric objects), so embedded or
test operators do not share counters. Outcomes are counted once, when a generation reaches Succeeded or
Failed while this process watches it.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

DURATION_BUCKETS = (30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)


class Metrics:
    """ms2mg_conversions_total{result,reason}, ms2mg_conversion_duration_seconds, ms2mg_converted_bytes_total,
    ms2mg_jobs_created_total."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.conversions = Counter(
            "ms2mg_conversions", "Conversions that finished, by result (succeeded|failed) and reason.",
            ["result", "reason"], registry=self.registry)
        self.duration = Histogram(
            "ms2mg_conversion_duration_seconds", "Wall time of finished conversions (converter-reported when "
            "available, else Job start to completion).", ["result"], buckets=DURATION_BUCKETS,
            registry=self.registry)
        self.bytes = Counter("ms2mg_converted_bytes", "Bytes written by successful conversions.",
                             registry=self.registry)
        self.jobs_created = Counter("ms2mg_jobs_created", "Converter Jobs created by the operator.",
                                    registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def record_outcome(self, *, succeeded: bool, reason: str, seconds: float | None,
                       written_bytes: int | None) -> None:
        result = "succeeded" if succeeded else "failed"
        self.conversions.labels(result=result, reason=reason).inc()
        if seconds is not None:
            self.duration.labels(result=result).observe(seconds)
        if succeeded and written_bytes:
            self.bytes.inc(written_bytes)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Start the /metrics HTTP server in a daemon thread."""
        self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
