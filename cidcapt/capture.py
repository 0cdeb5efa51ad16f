"""Run one capture: ask cidd to switch a job's nodes to an image, follow its events, re-attach when cut off.

The wait ends with cidd's ``done`` event, with the client's own deadline (the capture's timeout plus a
grace period, for a cidd that went silent), or with an error. Re-attaching is safe because cidd keys
captures by job id: the same ``capture`` request again joins the running capture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from cidcapt.connection import Backoff, Clock, Connection, Sleep, Timing, described, open_session
from cidcapt.errors import BadServerReply, ConnectionLost, Unreachable, error_from_wire
from cidcommon.tlsfiles import ClientTls

#: Capture states that mean "over": the reply of a re-attach to an ended capture is final.
FINAL_STATES = frozenset({"ok", "failed", "deadline", "cancelled"})


@dataclass(frozen=True)
class CaptureRequest:
    """What to ask for: ``nodes`` is the compact hostlist, ``names`` the expanded node names."""

    job: str
    nodes: str
    names: tuple[str, ...]
    image: str
    timeout: float
    user: str

    def message(self) -> dict[str, Any]:
        """Return the ``capture`` message (without ``id``; the connection adds it)."""
        timeout: float | int = int(self.timeout) if float(self.timeout).is_integer() else self.timeout
        return {"type": "capture", "job": self.job, "nodes": self.nodes, "image": self.image,
                "timeout": timeout, "user": self.user, "watch": True}


@dataclass(frozen=True)
class Endpoint:
    """Where cidd is and how to prove who we are."""

    host: str
    port: int
    role: str
    token: str
    tls: ClientTls | None = None  # None: plain TCP (only when cidd is configured so)
    origin: str = ""  # where the address came from (cidcommon.client_config), for messages

    @property
    def address(self) -> str:
        """Return ``host:port`` (or the socket's path) and its origin, for messages."""
        return described(self.host, self.port, self.origin)


@dataclass
class Outcome:
    """How a capture ended: ``state`` is ``ok``, ``failed`` or ``deadline``; ``nodes`` maps name -> info."""

    job: str
    image: str
    state: str
    nodes: dict[str, dict[str, Any]]
    local_deadline: bool = False  # True when the client's own deadline ended the wait (no ``done`` came)
    reattached: int = 0
    cancelled_by: str | None = None  # who cancelled the capture (state ``cancelled``: cidcapt --cancel)


class Listener(Protocol):
    """What the runner tells about its progress (cidcapt.render.Renderer implements it)."""

    def message(self, message: dict[str, Any]) -> None:
        """A reply or event received from cidd."""

    def accepted(self, request: CaptureRequest, capture: dict[str, Any], nodes: dict[str, dict[str, Any]],
                 reattach: bool) -> None:
        """The capture request was accepted (first time, or again after a lost connection)."""

    def node_changed(self, event: dict[str, Any]) -> None:
        """A node changed state."""

    def progress(self, event: dict[str, Any]) -> None:
        """A node's install progressed (a ``progress`` event: step, bytes done and total)."""

    def tick(self) -> float | None:
        """Called while waiting for events; return the most seconds to wait before the next call (None: no limit)."""

    def lost(self, request: CaptureRequest, address: str, reason: str, accepted: bool) -> None:
        """The session was lost; the runner is about to reconnect."""


@dataclass
class CaptureRunner:
    """Runs one capture to its end; ``run`` returns the Outcome, ``nodes`` holds the last known states."""

    request: CaptureRequest
    endpoint: Endpoint
    listener: Listener
    connect_timeout: float = 10.0
    timing: Timing = field(default_factory=Timing)
    clock: Clock = time.monotonic
    sleep: Sleep = time.sleep
    accepted: bool = field(default=False, init=False)  # cidd accepted the capture at least once
    reattached: int = field(default=0, init=False)  # how many times it was accepted again after a loss
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)  # last known node states
    _acceptances: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.nodes = {name: {"state": "requested", "image": None, "reason": None} for name in self.request.names}

    def run(self) -> Outcome:
        """Return the Outcome once cidd said ``done`` or the local deadline passed.

        Raises the error class of a wire error (bad request, refused, auth, ...), Unreachable when cidd
        could not be reached within the connect timeout (before acceptance) or before the local deadline
        (after acceptance), BadServerReply when the peer does not speak the protocol.
        """
        start = self.clock()
        local_deadline = start + self.request.timeout + self.timing.grace
        connect_deadline = start + self.connect_timeout
        backoff = Backoff(self.timing.backoff_first, self.timing.backoff_max)
        while True:
            limit = local_deadline if self.accepted else connect_deadline
            acceptances = self._acceptances
            try:
                with open_session(self.endpoint.host, self.endpoint.port, self.endpoint.role,
                                  self.endpoint.token, deadline=limit, timing=self.timing, clock=self.clock,
                                  sleep=self.sleep, tls=self.endpoint.tls, origin=self.endpoint.origin) as conn:
                    return self._session(conn, local_deadline)
            except Unreachable as exc:  # ConnectionLost too
                failure = exc
            reason = failure.reason
            if self._acceptances != acceptances:
                backoff.reset()  # that session worked for a while: start again with a short pause
            # Once cidd has accepted the capture, re-attaching goes on until the capture's own deadline (with
            # backoff), however long the first session lasted: a cidd restart is no reason to give up.
            limit = local_deadline if self.accepted else connect_deadline
            now = self.clock()
            if now >= limit:
                if self.accepted:
                    raise Unreachable(
                        f"lost the connection to cidd at {self.endpoint.address} and could not re-attach to "
                        f"job {self.request.job} before the deadline ({reason}); the capture may still run in "
                        "cidd: see 'cidcapt --captures' and cidd's log", reason=reason)
                if isinstance(failure, ConnectionLost):
                    raise Unreachable(f"gave up on cidd at {self.endpoint.address} after "
                                      f"{self.connect_timeout:g} s: {reason}; check that cidd is healthy "
                                      "(its log) and --server", reason=reason)
                raise failure
            self.listener.lost(self.request, self.endpoint.address, reason, self.accepted)
            self.sleep(min(backoff.next(), limit - now))

    def _session(self, conn: Connection, local_deadline: float) -> Outcome:
        """Send the capture on an open session and follow it; return the Outcome (see ``run``)."""
        reattach = self.accepted
        timeout = self.timing.request_timeout
        if reattach:
            timeout = max(min(timeout, local_deadline - self.clock()), 0.1)
        message = self.request.message()
        if reattach:  # a capture of the job cancelled meanwhile is answered as it is, not started anew
            message["reattach"] = True
        reply = conn.request(message, timeout=timeout)
        capture = reply.get("capture")
        if not isinstance(capture, dict):
            raise BadServerReply(f"cidd at {conn.address} answered the capture without a 'capture' object; "
                                 "is it a compatible cidd version?")
        self.listener.message(reply)
        nodes = capture.get("nodes")
        if isinstance(nodes, dict) and nodes:
            for name in [n for n, info in self.nodes.items() if info.get("state") == "requested"]:
                if name not in nodes:
                    del self.nodes[name]  # cidd names the capture's nodes; trust its list
        self._merge(nodes)
        self.accepted = True
        self._acceptances += 1
        if reattach:
            self.reattached += 1
        self.listener.accepted(self.request, capture, self.nodes, reattach)
        if capture.get("state") in FINAL_STATES:
            return self._outcome(capture["state"], cancelled_by=capture.get("cancelled_by"))
        last_seen = self.clock()
        while True:
            now = self.clock()
            if now >= local_deadline:
                return self._outcome("deadline", local=True)
            if now - last_seen >= self.timing.silence_timeout:
                conn.close()
                raise ConnectionLost(f"nothing came from cidd for {self.timing.silence_timeout:g} s, "
                                     "not even a keepalive")
            wait = min(local_deadline, last_seen + self.timing.silence_timeout) - now
            pause = self.listener.tick()  # the listener's summary line or redraw is due then
            message = conn.next_message(wait if pause is None else min(wait, max(pause, 0.01)))
            if message is None:
                continue
            last_seen = self.clock()
            done = self._handle(message)
            if done is not None:
                return done

    def _handle(self, message: dict[str, Any]) -> Outcome | None:
        """Apply one message received while watching; return the Outcome when it is ``done``.

        Raises the matching error class for an ``error`` message.
        """
        kind = message.get("type")
        if kind == "keepalive":
            return None
        if kind == "error":
            raise error_from_wire(message)
        if message.get("job") not in (None, self.request.job):
            return None
        if kind not in ("node", "progress", "done"):
            return None  # replies to nothing we asked, and event types added later
        self.listener.message(message)
        if kind == "node":
            self._node_event(message)
        elif kind == "progress":
            self._progress(message)
        else:
            self._merge(message.get("nodes"))
            state = message.get("state")
            return self._outcome(state if state in FINAL_STATES else self._guess_state(),
                                 cancelled_by=message.get("cancelled_by"))
        return None

    def _node_event(self, event: dict[str, Any]) -> None:
        """Record a node state change and tell the listener."""
        name = event.get("node")
        if not isinstance(name, str):
            return
        info = self.nodes.setdefault(name, {"state": None, "image": None, "reason": None})
        new = event.get("to")
        info["state"] = new
        info.pop("step", None)
        detail = event.get("reason") or event.get("detail")
        if new == "ready":
            info["image"] = event.get("image") or info.get("image")
            info["reason"] = None
        elif new == "failed":
            info["reason"] = detail
        elif detail:
            info["detail"] = detail
        self.listener.node_changed(event)

    def _progress(self, event: dict[str, Any]) -> None:
        """Record where a node's installation stands (shown for nodes still pending at the end)."""
        name = event.get("node")
        if isinstance(name, str) and name in self.nodes:
            step = str(event.get("step") or "working")
            done, total = event.get("done"), event.get("total")
            if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
                step = f"{step} {100.0 * done / total:.0f}%"
            self.nodes[name]["step"] = step
            self.listener.progress(event)

    def _merge(self, nodes: Any) -> None:
        """Overwrite the known node states with a ``nodes`` object from a reply or ``done``."""
        if not isinstance(nodes, dict):
            return
        for name, info in nodes.items():
            if isinstance(info, dict):
                known = self.nodes.setdefault(name, {})
                step = known.get("step") if info.get("state") == known.get("state") else None
                known.clear()
                known.update(info)
                if step:
                    known["step"] = step

    def _guess_state(self) -> str:
        """Return the outcome state the node states imply (for a ``done`` with an unknown state)."""
        states = [info.get("state") for info in self.nodes.values()]
        if all(state == "ready" for state in states):
            return "ok"
        return "failed" if "failed" in states else "deadline"

    def _outcome(self, state: str, *, local: bool = False, cancelled_by: Any = None) -> Outcome:
        """Return the Outcome for ``state`` with a copy of the node states (and who cancelled it, if cidd said)."""
        nodes = {name: dict(info) for name, info in self.nodes.items()}
        return Outcome(job=self.request.job, image=self.request.image, state=state, nodes=nodes,
                       local_deadline=local, reattached=self.reattached,
                       cancelled_by=cancelled_by if isinstance(cancelled_by, str) else None)
