"""Follow a capture while cidcapt waits: fold cidd's events into counts, bytes, rates and nodes that do not move.

No I/O and no terminal code: ``ProgressModel`` is fed what the capture's session brings (the nodes of the
``capture`` reply, ``node`` and ``progress`` events, docs/protocol.md) and returns a ``Summary`` on request.
Time comes from an injected clock (``time.monotonic`` in cidcapt, a fake one in tests). The renderers are
``cidcapt.progress_text`` (plain lines for logs) and ``cidcapt.progress_live`` (the terminal view).

A node *moves* when it enters another state or its install writes more bytes; climbing to the next ladder rung
of the same wait is not moving (cidd gave up waiting on the previous rung). A pending node that has not moved
for ``stall_after`` seconds is *stalled*.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

Clock = Callable[[], float]

#: Pending states in the order a switch goes through them (others, unexpected, are shown after these).
PIPELINE = ("requested", "offline", "other_image", "in_installer", "to_installer", "installing", "to_image")
#: States that wait for a reboot on a rung of the escalation ladder (docs/state-machine.md).
LADDER_STATES = frozenset({"to_installer", "to_image"})
#: A node ``ready`` in another image than the capture's is counted under this name (it has not started yet).
OTHER_IMAGE = "other_image"


class Change(Enum):
    """What a ``node`` event meant for the person following the capture."""

    MOVED = "moved"  # another pending state
    READY = "ready"  # ready in the capture's image
    FAILED = "failed"
    CLIMBED = "climbed"  # the same wait, on the next ladder rung: the previous rung did not bring the node
    RETRIED = "retried"  # the same state, a later install attempt: the previous attempt failed
    SAME = "same"  # nothing new (a repeated state, or an event without a node)


@dataclass(frozen=True)
class ProgressOptions:
    """How cidcapt shows a capture's progress on stderr (``--summary-every``, ``--stall-after``).

    ``live`` None: the terminal view when stderr is a terminal (and not ``TERM=dumb``) and neither ``--json``
    nor ``--quiet`` is given; plain lines otherwise. ``clock`` is monotonic, ``wall`` the Unix time (to turn
    cidd's deadline into time left).
    """

    summary_every: float = 30.0
    stall_after: float = 180.0
    clock: Clock = time.monotonic
    wall: Clock = time.time
    live: bool | None = None


@dataclass(frozen=True)
class Install:
    """One node's install in progress: bytes ``done`` of ``total`` (None: unknown), ``rate`` in bytes/s."""

    node: str
    step: str
    done: int
    total: int | None
    rate: float | None


@dataclass(frozen=True)
class Wait:
    """A node in ``state`` for ``seconds`` (on ladder ``rung``)."""

    node: str
    state: str
    rung: int
    seconds: float


@dataclass(frozen=True)
class Summary:
    """Where a capture stands at one moment.

    ``states`` counts the pending nodes per state (pipeline order); ``installs`` holds the installs in
    progress, slowest first; ``ladder`` the nodes waiting on rung 1 or later (time on that rung); ``stalled``
    the pending nodes that did not move for ``stall_after`` seconds, longest first; ``longest`` the longest
    wait per pending state. ``rate`` (bytes/s, all installs) is None until an install has two samples;
    ``deadline_left`` is None when cidd named no deadline.
    """

    total: int
    ready: int
    failed: int
    states: dict[str, int]
    bytes_done: int
    bytes_total: int
    rate: float | None
    installs: tuple[Install, ...]
    ladder: tuple[Wait, ...]
    stalled: tuple[Wait, ...]
    longest: dict[str, Wait]
    elapsed: float
    deadline_left: float | None
    stall_after: float


@dataclass
class _Node:
    state: str
    since: float  # entered ``state`` (or first seen in it)
    moved: float  # last state change or byte progress
    rung: int = 0
    rung_since: float = 0.0
    attempt: int = 0
    step: str = ""
    done: int = 0
    total: int | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes done) of the current install


def _number(value: Any) -> float | None:
    """Return ``value`` as a float when it is a number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class ProgressModel:
    """The progress of one capture to ``image``; feed it events, ask it for a ``summary``."""

    def __init__(self, image: str, clock: Clock, *, stall_after: float = 180.0, rate_window: float = 10.0) -> None:
        self.image = image
        self.clock = clock
        self.stall_after = stall_after
        self.rate_window = rate_window
        self.nodes: dict[str, _Node] = {}
        self.started: float | None = None
        self.deadline: float | None = None  # on ``clock``

    def _bucket(self, state: Any, image: Any) -> str:
        """Return the state a node is counted in (``other_image`` for ready in another image)."""
        name = str(state or "requested")
        if name == "ready" and image not in (self.image, None):
            return OTHER_IMAGE
        return name

    def accepted(self, nodes: Mapping[str, Any], deadline_in: float | None) -> None:
        """Take the nodes of an accepted ``capture`` reply (first time or re-attached) and the time left."""
        now = self.clock()
        if self.started is None:
            self.started = now
        if deadline_in is not None:
            self.deadline = now + max(deadline_in, 0.0)
        for name, info in nodes.items():
            info = info if isinstance(info, Mapping) else {}
            state = self._bucket(info.get("state"), info.get("image"))
            known = self.nodes.get(name)
            if known is None:
                self.nodes[name] = _Node(state=state, since=now, moved=now, rung_since=now)
            elif known.state != state:
                self._enter(known, state, now)

    def _enter(self, node: _Node, state: str, now: float) -> None:
        """Move ``node`` to another state at ``now``: it moved, its rung and install start again."""
        node.state, node.since, node.moved = state, now, now
        node.rung, node.rung_since = 0, now
        if state != "installing":
            node.step, node.done, node.total, node.samples = "", 0, None, []

    def node(self, event: Mapping[str, Any]) -> Change:
        """Apply a ``node`` event; return what it meant (Change)."""
        name = event.get("node")
        if not isinstance(name, str):
            return Change.SAME
        now = self.clock()
        state = self._bucket(event.get("to"), event.get("image"))
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = _Node(state="requested", since=now, moved=now, rung_since=now)
        rung, attempt = _number(event.get("rung")), _number(event.get("attempt"))
        new_rung = int(rung) if rung is not None else 0
        new_attempt = int(attempt) if attempt is not None else node.attempt
        if state == node.state:
            if new_rung > node.rung:
                node.rung, node.rung_since, node.attempt = new_rung, now, new_attempt
                return Change.CLIMBED
            if new_attempt > node.attempt:
                node.attempt = new_attempt
                return Change.RETRIED
            return Change.SAME
        self._enter(node, state, now)
        node.rung, node.attempt = new_rung, new_attempt
        if state == "ready":
            return Change.READY
        return Change.FAILED if state == "failed" else Change.MOVED

    def progress(self, event: Mapping[str, Any]) -> None:
        """Apply a ``progress`` event (bytes ``done`` of ``total`` at ``step``) of an install."""
        name = event.get("node")
        done = _number(event.get("done"))
        if not isinstance(name, str) or name not in self.nodes or done is None:
            return
        node, now = self.nodes[name], self.clock()
        step = str(event.get("step") or "working")
        if step != node.step or done < node.done:
            node.samples = []  # another step or another attempt: its rate starts again
        elif done > node.done:
            node.moved = now
        if not node.samples:
            node.moved = now
        node.step, node.done = step, int(done)
        total = _number(event.get("total"))
        node.total = int(total) if total is not None and total > 0 else None
        node.samples.append((now, int(done)))
        newest = node.samples[-1][0]
        while len(node.samples) > 2 and node.samples[1][0] <= newest - self.rate_window:
            node.samples.pop(0)  # keep one sample at or before the window as the reference

    def _rate(self, node: _Node, now: float) -> float | None:
        """Return the node's install rate in bytes/s over the window (0 when it stopped), None before 2 samples."""
        if len(node.samples) < 2:
            return None
        (first_t, first_done), (last_t, last_done) = node.samples[0], node.samples[-1]
        if now - last_t > self.rate_window or last_t <= first_t:
            return 0.0
        return max(last_done - first_done, 0) / (last_t - first_t)

    def summary(self) -> Summary:
        """Return where the capture stands now (Summary)."""
        now = self.clock()
        started = self.started if self.started is not None else now
        counts: dict[str, int] = {}
        installs: list[Install] = []
        ladder: list[Wait] = []
        stalled: list[Wait] = []
        longest: dict[str, Wait] = {}
        for name, node in self.nodes.items():
            counts[node.state] = counts.get(node.state, 0) + 1
            if node.state in ("ready", "failed"):
                continue
            wait = Wait(name, node.state, node.rung, now - node.since)
            if node.state not in longest or wait.seconds > longest[node.state].seconds:
                longest[node.state] = wait
            if node.state == "installing" and node.samples:
                installs.append(Install(name, node.step, node.done, node.total, self._rate(node, now)))
            if node.state in LADDER_STATES and node.rung > 0:
                ladder.append(Wait(name, node.state, node.rung, now - node.rung_since))
            if now - node.moved >= self.stall_after:
                stalled.append(Wait(name, node.state, node.rung, now - node.moved))
        order = {state: i for i, state in enumerate(PIPELINE)}
        pending = {state: counts[state] for state in sorted(
            (s for s in counts if s not in ("ready", "failed")), key=lambda s: (order.get(s, len(order)), s))}
        installs.sort(key=lambda i: (i.rate if i.rate is not None else float("inf"), i.done, i.node))
        return Summary(
            total=len(self.nodes), ready=counts.get("ready", 0), failed=counts.get("failed", 0), states=pending,
            bytes_done=sum(i.done for i in installs), bytes_total=sum(i.total or i.done for i in installs),
            rate=sum(rates) if (rates := [i.rate for i in installs if i.rate is not None]) else None,
            installs=tuple(installs),
            ladder=tuple(sorted(ladder, key=lambda w: (-w.seconds, w.node))),
            stalled=tuple(sorted(stalled, key=lambda w: (-w.seconds, w.node))), longest=longest,
            elapsed=now - started,
            deadline_left=None if self.deadline is None else max(self.deadline - now, 0.0),
            stall_after=self.stall_after)
