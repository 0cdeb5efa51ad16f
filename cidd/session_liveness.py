"""Liveness of a cidd session (docs/protocol.md, "Heartbeats"): the hello and handshake timers, an agent's
silence limit and the heartbeat interval it is told.

``SessionLiveness`` is mixed into cidd.sessions.PeerProtocol, before ``HelloChecks`` (whose stubs of ``_touch``
and ``heartbeat_now`` it provides). Every timeout is confirmed one turn of the reactor later, once what waits on
the sockets was read (``after_reads``): a cidd busy with thousands of handshakes never drops a peer whose hello or
heartbeat is already waiting.
"""

from __future__ import annotations

from typing import Any

import structlog
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from cidcommon import wire
from cidcommon.twisted_requests import after_reads
from cidcommon.wire import HELLO_TIMEOUT
from cidd.core.heartbeats import heartbeat_interval, silence_limit, worth_retelling
from cidd.session_hello import SessionSurface

log = structlog.get_logger(__name__)

#: Over TLS, the seconds a peer has from its TCP connection to the end of the TLS handshake; HELLO_TIMEOUT then
#: counts from the handshake's end. A handshake that waited while cidd served thousands of others (a mass
#: reconnect, 10,000 nodes rebooting at once) is not the peer's fault: dropping it would only make the agent come
#: back later and cost cidd a second handshake. Agents wait as long for the answer to their hello
#: (cidkid.protocol.HELLO_ANSWER_TIMEOUT).
HANDSHAKE_TIMEOUT = 120.0


class SessionLiveness(SessionSurface):
    """The timers of one session and the heartbeat interval of an agent (see the module docstring)."""

    # What the session (cidd.sessions.PeerProtocol) provides: declared here for the type checker.
    factory: Any
    clock: IReactorTime
    transport: Any
    role: str | None
    node: str | None
    closed: bool
    session_id: str
    _hello_timer: IDelayedCall | None
    _idle_timer: IDelayedCall | None
    heartbeat: float | None  # the interval this agent was last told
    silence_limit: float  # grows with the intervals told

    # --- hello ---

    def start_hello_timer(self) -> None:
        """Give a new peer HELLO_TIMEOUT for its hello, or HANDSHAKE_TIMEOUT over TLS (restarted at its end)."""
        limit = HANDSHAKE_TIMEOUT if self.factory.tls else HELLO_TIMEOUT
        self._hello_timer = self.clock.callLater(limit, after_reads, self.clock, self._no_hello)

    def handshake_done(self) -> None:
        """The TLS handshake ended: HELLO_TIMEOUT counts from now."""
        if self.role is None and self._hello_timer is not None and self._hello_timer.active():
            # cancel and start again: moving a timer sooner (``reset``) scans all of the reactor's timers
            self._hello_timer.cancel()
            self._hello_timer = self.clock.callLater(HELLO_TIMEOUT, after_reads, self.clock, self._no_hello)

    def _no_hello(self) -> None:
        """The hello timer ran out (confirmed after the reactor read what waits): say so and close."""
        self._hello_timer = None
        if self.closed or self.role is not None:
            return
        log.warning("session.hello_timeout", peer=self.peer, session=self.session_id)
        self.send(wire.error("out_of_order", f"no hello within {HELLO_TIMEOUT:g}s"))
        self.close()

    def stop_timers(self) -> None:
        """Cancel the hello and idle timers (the session ended)."""
        for timer in (self._hello_timer, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()

    # --- silence and heartbeats ---

    def _touch(self) -> None:
        """Push back the idle deadline of an agent session (``silence_limit``: 3 x the longest heartbeat interval it
        was told, at most 55 s)."""
        if self.role != wire.AGENT_ROLE and self.node is None:
            return
        limit = self.silence_limit
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(limit)
        else:
            self._idle_timer = self.clock.callLater(limit, self._idle)

    def _idle(self) -> None:
        """The idle limit passed: confirm after the reactor read what waits (``_touch`` may re-arm the timer)."""
        after_reads(self.clock, self._silent)

    def _silent(self) -> None:
        """Abort the session unless a line arrived since the idle timer fired."""
        if self.closed or (self._idle_timer is not None and self._idle_timer.active()):
            return
        log.warning("agent.silent", node=self.node, session=self.session_id)
        if self.transport is not None:
            self.transport.abortConnection()

    def heartbeat_now(self) -> float:
        """Return the heartbeat interval for this session now (from the number of agent sessions), and remember
        it as told: the session's silence limit follows the longest interval told (cidd/core/heartbeats.py) and
        counts from now (a line just came)."""
        config = self.factory.engine.config
        interval = heartbeat_interval(len(self.factory.sessions.agents), config.heartbeat, config.heartbeat_rate)
        self.heartbeat = interval
        self.silence_limit = max(self.silence_limit, silence_limit(interval, config.heartbeat))
        self._touch()
        return interval

    def _heartbeat_reply(self, message: wire.Message) -> dict[str, Any]:
        """Return the reply to a heartbeat: empty, or with ``heartbeat`` when this agent's interval moved by 10 %
        or more since it was last told (docs/protocol.md)."""
        config = self.factory.engine.config
        interval = heartbeat_interval(len(self.factory.sessions.agents), config.heartbeat, config.heartbeat_rate)
        if self.heartbeat is None or worth_retelling(self.heartbeat, interval):
            return wire.reply(message.get("id"), heartbeat=self.heartbeat_now())
        return wire.reply(message.get("id"))
