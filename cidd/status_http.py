"""Read-only views of cidd over HTTP: ``/status`` (JSON) and node/capture gauges for ``/metrics``.

The JSON has the same node rows as the ``status`` request of the wire protocol (docs/protocol.md).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from cidd.core.machine import State
from cidd.engine import Engine


class StatusResource(Resource):
    """``GET /status``: every node's state and the running captures, as JSON."""

    isLeaf = True

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def render_GET(self, request: Request) -> bytes:
        """Return the JSON document."""
        engine = self.engine
        body = {
            "nodes": [engine.node_status(name) for name in sorted(engine.nodes)],
            "captures": [engine.describe(capture) for capture in engine.captures.values()],
            "images": sorted(engine.catalog),
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, separators=(",", ":")).encode()


class EngineCollector(Collector):
    """Prometheus collector computing node and capture gauges at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield cid_nodes{state}, cid_nodes_online, cid_captures_running and the windows' gauges."""
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
