"""What cidd observes as the engine works: Prometheus histograms and counters, install progress, failure streaks
and the latest failures (for ``/metrics``, ``/status`` and the status page).

An :class:`Observer` is one of the engine's observers (``Engine.observers``): it is told of every committed
transition, capture end and progress report. Labels stay bounded: an image outside the catalog counts as
``other``, a node by its group, a failure by its kind (cidd.core.stats.failure_kind); never a node name.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cidd.core.captures import Capture
from cidd.core.machine import SWITCHING, State, Step
from cidd.core.stats import REBOOT_PHASES, failure_kind, timed
from cidd.engine import Engine
from cidd.metrics import Metrics
from cidd.store import Store

#: Bounds of the phase-duration buckets (seconds): a kexec takes seconds, a BIOS POST minutes, an install more.
PHASE_BUCKETS = (1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300, 450, 600, 900, 1200, 1800, 2700, 3600, 7200)
#: Bounds of the capture-duration buckets (seconds).
CAPTURE_BUCKETS = (1, 5, 10, 30, 60, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 14400)
#: ``cid_failure_streak_nodes{streak}``: nodes whose last N switches (at least) all failed.
STREAKS = (1, 2, 3, 5, 10)
RECENT_FAILURES = 20


class Observer(Collector):
    """Turns the engine's committed steps into metrics and live views; also a scrape-time collector."""

    def __init__(self, engine: Engine, metrics: Metrics, store: Store | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.progress_of: dict[str, dict[str, Any]] = {}  # node -> latest progress while installing
        self.streaks: dict[str, int] = {}  # node -> switches failed in a row (0 after a success)
        self.failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)  # newest first
        m = metrics
        self.phase_seconds = m.histogram(
            "cid_phase_duration_seconds", "Time nodes spent in a phase of a switch that went on (seconds).",
            ("phase", "image", "group"), PHASE_BUCKETS)
        self.capture_seconds = m.histogram(
            "cid_capture_duration_seconds", "Time from a capture's start to its end (seconds).",
            ("image", "group"), CAPTURE_BUCKETS)
        self.transitions = m.counter("cid_transitions_total", "Node state transitions.", ("from", "to"))
        self.failed = m.counter("cid_failures_total", "Switches that ended in failed, by kind of reason.",
                                ("reason", "group"))
        self.rungs = m.counter("cid_ladder_rungs_total",
                               "Reboot waits a node left by booting, by the ladder rung that got it there.",
                               ("phase", "rung", "group"))
        self.climbs = m.counter("cid_ladder_climbs_total", "Climbs of the escalation ladder, by the rung reached.",
                                ("phase", "rung", "group"))
        self.installs = m.counter("cid_installs_total", "Installs by result (ok, failed, retried, abandoned).",
                                  ("image", "result"))
        self.captures = m.counter("cid_captures_total",
                                  "Captures that ended, by end state (ok, failed, deadline, cancelled).",
                                  ("image", "state"))
        if store is not None:
            self.load(store)
        metrics.registry.register(self)

    def load(self, store: Store) -> None:
        """Seed the failure streaks and the latest failures from the events still in ``store``."""
        for node, to in store.switch_ends():
            self.streaks[node] = self.streaks.get(node, 0) + 1 if to == State.FAILED.value else 0
        for row in store.recent_failures(RECENT_FAILURES):
            self.failures.append({**row, "kind": failure_kind(row["reason"])})

    # --- labels ---

    def image_label(self, image: str | None) -> str:
        """Return ``image`` when the catalog has it, ``none`` for no image, else ``other``."""
        if image is None:
            return "none"
        return image if image in self.engine.catalog else "other"

    def group_of(self, node: str) -> str:
        """Return the node's group (``default`` for a node outside the inventory)."""
        return self.engine.groups.get(node, "default")

    # --- engine hooks ---

    def transition(self, step: Step, now: float) -> None:
        """Count a committed transition: phase time, rungs, climbs, installs, failures and streaks."""
        t = step.transition
        if t is None:
            return
        phase, to = t.from_state, t.to_state
        self.transitions.labels(**{"from": phase, "to": to}).inc()
        group, image = self.group_of(t.node), self.image_label(t.image)
        self.progress_of.pop(t.node, None)  # a new step (or a new install attempt) has no progress yet
        if phase not in {s.value for s in SWITCHING}:
            return
        if to == phase:
            if phase == State.INSTALLING.value:
                self.installs.labels(image=image, result="retried").inc()
            else:
                self.climbs.labels(phase=phase, rung=str(t.rung), group=group).inc()
            return
        if timed(phase, to):
            self.phase_seconds.labels(phase=phase, image=image, group=group).observe(t.elapsed)
            if phase in REBOOT_PHASES:
                self.rungs.labels(phase=phase, rung=str(t.rung), group=group).inc()
        if phase == State.INSTALLING.value:
            result = {State.TO_IMAGE.value: "ok", State.FAILED.value: "failed"}.get(to, "abandoned")
            self.installs.labels(image=image, result=result).inc()
        if to == State.READY.value:
            self.streaks[t.node] = 0
        elif to == State.FAILED.value:
            kind = failure_kind(t.detail)
            self.failed.labels(reason=kind, group=group).inc()
            self.streaks[t.node] = self.streaks.get(t.node, 0) + 1
            self.failures.appendleft({"ts": now, "node": t.node, "job": t.job, "image": t.image,
                                      "reason": t.detail, "kind": kind})

    def capture_ended(self, capture: Capture, now: float) -> None:
        """Count an ended capture and its duration (group: its nodes' group, or ``mixed``)."""
        image = self.image_label(capture.image)
        groups = {self.group_of(name) for name in capture.nodes}
        group = groups.pop() if len(groups) == 1 else "mixed"
        self.capture_seconds.labels(image=image, group=group).observe(max(0.0, now - capture.created))
        self.captures.labels(image=image, state=capture.state.value).inc()

    def progress(self, name: str, message: dict[str, Any]) -> None:
        """Keep the latest install progress of ``name`` (shown by /status while it installs)."""
        node = self.engine.nodes.get(name)
        if node is None or node.state is not State.INSTALLING:
            return
        self.progress_of[name] = {key: message.get(key) for key in ("step", "done", "total", "rate")}

    # --- scrape time ---

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield ``cid_failure_streak_nodes{group, streak}``: nodes whose last ``streak`` switches all failed."""
        family = GaugeMetricFamily("cid_failure_streak_nodes",
                                   "Nodes whose latest switches (at least 'streak' of them) all failed",
                                   labels=["group", "streak"])
        counts: dict[str, list[int]] = {group: [0] * len(STREAKS) for group in self.engine.config.groups}
        for node, streak in self.streaks.items():
            row = counts.setdefault(self.group_of(node), [0] * len(STREAKS))
            for index, bound in enumerate(STREAKS):
                if streak >= bound:
                    row[index] += 1
        for group, row in sorted(counts.items()):
            for bound, count in zip(STREAKS, row, strict=True):
                family.add_metric([group, str(bound)], count)
        yield family
