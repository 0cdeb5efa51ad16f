"""Read-only views of cidd over HTTP: ``/status`` and ``/stats`` (JSON), the status page at ``/``, and the
node/capture gauges of ``/metrics``.

The JSON of ``/status`` has the same node rows as the ``status`` request of the wire protocol
(docs/protocol.md), plus each installing node's latest ``progress``, the latest ``failures`` and the server's
``time``; ``/stats`` answers what a ``stats`` request does (docs/operations.md). These views hold no secret
(no token, no boot token, no BMC credential); they are served on the HTTP port with the same exposure as
``/status`` (docs/security.md).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from cidcommon.errors import CidError
from cidd.core.heartbeats import heartbeat_interval
from cidd.core.machine import State
from cidd.core.stats import quantile
from cidd.engine import Engine
from cidd.history import History, query_from_args
from cidd.observe import Observer
from cidd.status_page import CSS, HEADERS, HTML, JS

log = structlog.get_logger("cidd.http")

#: ``cid_heartbeat_age_seconds{quantile}``: the quantiles of the time since each online agent was last heard.
HEARTBEAT_QUANTILES = (0.5, 0.9, 0.99, 1.0)


def _json(request: Request, body: Any, code: int = http.OK) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode()


class StatusResource(Resource):
    """``GET /status``: every node's state and the running captures, as JSON."""

    isLeaf = True

    def __init__(self, engine: Engine, observer: Observer | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.observer = observer

    def render_GET(self, request: Request) -> bytes:
        """Return the JSON document."""
        engine = self.engine
        nodes = [engine.node_status(name) for name in sorted(engine.nodes)]
        failures: list[dict[str, Any]] = []
        if self.observer is not None:
            progress = self.observer.progress_of
            for row in nodes:
                row["progress"] = progress.get(row["node"])
            failures = list(self.observer.failures)
        body = {
            "nodes": nodes,
            "captures": [engine.describe(capture) for capture in engine.captures.values()],
            "images": sorted(engine.catalog),
            "failures": failures,
            "time": engine.clock.seconds(),
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, separators=(",", ":")).encode()


class StatsResource(Resource):
    """``GET /stats?since=&until=&nodes=&image=&job=&worst=``: the statistics of the event history, as JSON.

    A wrong parameter gets a 400 with ``{"error": ...}``; statistics that cannot be read a 500.
    """

    isLeaf = True

    def __init__(self, history: History) -> None:
        super().__init__()
        self.history = history

    def render_GET(self, request: Request) -> bytes | int:
        """Start the query and return NOT_DONE_YET, or return the error body of a bad query."""
        try:
            query = query_from_args(request.args or {})
        except CidError as exc:
            return _json(request, {"error": exc.message, "code": exc.code}, http.BAD_REQUEST)
        finished: list[bool] = []
        request.notifyFinish().addErrback(lambda _: finished.append(True))

        def answer(body: dict[str, Any]) -> None:
            if not finished:
                request.write(_json(request, body))
                request.finish()

        def failed(failure: Any) -> None:
            log.error("http.stats_failed", error=failure.getErrorMessage())
            if not finished:
                request.write(_json(request, {"error": f"cannot read the statistics: {failure.getErrorMessage()}"},
                                    http.INTERNAL_SERVER_ERROR))
                request.finish()

        self.history.stats(query).addCallbacks(answer, failed)
        return NOT_DONE_YET


class _Static(Resource):
    """A leaf answering GET with a fixed text and the page's security headers."""

    isLeaf = True

    def __init__(self, body: str, content_type: bytes) -> None:
        super().__init__()
        self.body = body.encode()
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        """Return the text."""
        request.setHeader(b"content-type", self.content_type)
        for name, value in HEADERS.items():
            request.setHeader(name, value)
        return self.body


def page_resources() -> dict[bytes, Resource]:
    """Return the status page's children of the HTTP root: ``b""`` (the page, at ``/``) and ``b"ui"``."""
    ui = Resource()
    ui.putChild(b"status.js", _Static(JS, b"text/javascript; charset=utf-8"))
    ui.putChild(b"status.css", _Static(CSS, b"text/css; charset=utf-8"))
    return {b"": _Static(HTML, b"text/html; charset=utf-8"), b"ui": ui}


class EngineCollector(Collector):
    """Prometheus collector computing node and capture gauges at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield cid_nodes{state}, cid_nodes_online, cid_captures_running, the windows' gauges,
        cid_nodes_image{image}, cid_agent_sessions{mode}, cid_heartbeat_age_seconds{quantile} and
        cid_heartbeat_interval_seconds."""
        by_state = Counter(node.state.value for node in self.engine.nodes.values())
        nodes = GaugeMetricFamily("cid_nodes", "Nodes by state", labels=["state"])
        for state in State:
            nodes.add_metric([state.value], by_state.get(state.value, 0))
        yield nodes
        online = sum(1 for node in self.engine.nodes.values() if node.online)
        yield GaugeMetricFamily("cid_nodes_online", "Nodes with a live agent session", value=online)
        yield GaugeMetricFamily("cid_captures_running", "Captures that have not ended",
                                value=len(self.engine.captures))
        holders = GaugeMetricFamily("cid_window_holders", "Nodes holding a slot of a reboot or power window",
                                    labels=["window"])
        waiting = GaugeMetricFamily("cid_window_waiting", "Nodes waiting for a slot of a window", labels=["window"])
        limits = GaugeMetricFamily("cid_window_limit", "Slots of a bounded window (absent: unbounded)",
                                   labels=["window"])
        for window in (self.engine.reboot_window, self.engine.power_window):
            holders.add_metric([window.name], window.in_flight)
            waiting.add_metric([window.name], window.waiting)
            if window.limit is not None:
                limits.add_metric([window.name], window.limit)
        yield from (holders, waiting, limits)
        yield from self._fleet()

    def _fleet(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauges by image, by agent mode and of heartbeat ages (labels bounded by the catalog)."""
        engine = self.engine
        catalog = engine.catalog
        images: Counter[str] = Counter()
        modes: Counter[str] = Counter()
        now = engine.clock.seconds()
        ages: list[tuple[float, int]] = []
        for name, node in engine.nodes.items():
            images["none" if node.image is None else node.image if node.image in catalog else "other"] += 1
            if node.online:
                modes[node.mode or "unknown"] += 1
                seen = engine.health.get(name)
                if seen is not None:
                    ages.append((max(0.0, now - seen[0]), 1))
        by_image = GaugeMetricFamily("cid_nodes_image", "Nodes by the image their agent last reported (verified)",
                                     labels=["image"])
        for image in sorted(set(catalog) | set(images)):
            by_image.add_metric([image], images.get(image, 0))
        yield by_image
        sessions = GaugeMetricFamily("cid_agent_sessions", "Live agent sessions by mode (system or installer)",
                                     labels=["mode"])
        for mode in sorted({"system", "installer"} | set(modes)):
            sessions.add_metric([mode], modes.get(mode, 0))
        yield sessions
        heard = GaugeMetricFamily("cid_heartbeat_age_seconds",
                                  "Quantiles of the time since each online agent was last heard (seconds)",
                                  labels=["quantile"])
        if ages:
            for q in HEARTBEAT_QUANTILES:
                heard.add_metric([f"{q:g}"], quantile(ages, q) or 0.0)
        yield heard
        config = engine.config
        yield GaugeMetricFamily("cid_heartbeat_interval_seconds",
                                "Heartbeat interval cidd gives its agents now (grows with their number)",
                                value=heartbeat_interval(sum(modes.values()), config.heartbeat, config.heartbeat_rate))
