"""Prometheus metrics of one cidd instance, and the ``/metrics`` resource that exposes them.

docs/operations.md lists every metric cidd exposes with its labels (a test checks the list against a real
scrape). Labels are bounded: images of the catalog, node groups, states, reasons by kind; never a node name.

Every :class:`Metrics` owns its own ``CollectorRegistry`` (never the process-global one), so several cidd
instances in one process (tests, benchmarks) do not clash.  Metric objects are created once and cached by
name; asking again for the same name returns the same object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request


class Metrics:
    """A registry of cidd's counters and gauges.

    Built in: ``cid_http_bytes_sent_total{image}`` (image bytes handed to HTTP clients) and
    ``cid_http_requests_total{code}`` (finished HTTP requests by status code).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, tuple[type, tuple[str, ...], Any]] = {}
        self.http_bytes = self.counter("cid_http_bytes_sent_total", "Image bytes sent over HTTP.", ("image",))
        self.http_requests = self.counter("cid_http_requests_total", "HTTP requests by status code.", ("code",))

    def _get(self, kind: type, name: str, doc: str, labels: Sequence[str], **extra: Any) -> Any:
        """Return the cached metric ``name``, creating it on first use.

        Raises ValueError if ``name`` was already created with another type or other labels.
        """
        labels = tuple(labels)
        found = self._metrics.get(name)
        if found is not None:
            if found[0] is not kind or found[1] != labels:
                raise ValueError(f"metric {name} already exists as {found[0].__name__}{list(found[1])}, "
                                 f"not {kind.__name__}{list(labels)}")
            return found[2]
        metric = kind(name, doc, labels, registry=self.registry, **extra)
        self._metrics[name] = (kind, labels, metric)
        return metric

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """Return the Counter ``name`` (a trailing ``_total`` is the exposition suffix). Raises ValueError."""
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        """Return the Gauge ``name`` with these label names. Raises ValueError on a clash (see ``_get``)."""
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
        """Return the Histogram ``name`` with these label names and bucket bounds. Raises ValueError on a clash."""
        return self._get(Histogram, name, doc, labels, buckets=tuple(buckets))

    def bytes_sent(self, image: str, count: int) -> None:
        """Add ``count`` bytes written to an HTTP client for the image id ``image``."""
        if count > 0:
            self.http_bytes.labels(image=image).inc(count)

    def request_done(self, code: int) -> None:
        """Count one HTTP request that ended with status ``code``."""
        self.http_requests.labels(code=str(code)).inc()

    def value(self, name: str, **labels: str) -> float | None:
        """Return the current sample ``name`` with exactly these labels, or None (handy in tests and status)."""
        return self.registry.get_sample_value(name, labels)

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """``GET /metrics``: the Prometheus text format of one :class:`Metrics`."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        """Return the exposition text (Content-Type set to Prometheus' text format)."""
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.render()

    def render_HEAD(self, request: Request) -> bytes:
        """Return no body, with the headers (and Content-Length) that GET would send."""
        body = self.render_GET(request)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b""
