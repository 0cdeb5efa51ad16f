"""Rate-limited security events: every refusal cidd makes goes through ``SecurityEvents.refused``.

A flood of bad logins must not flood the log. Per (kind, peer host) at most ``per_window`` events are logged
in each ``window`` seconds (``security.<kind>`` with their fields); the ones beyond are only counted, and one
``security.suppressed`` event with the count is logged when the window ends (at the next refusal of that key
or at the next ``flush``, which cidd calls every few seconds). Every refusal, logged or not, goes to the
``count`` callback (the ``cid_security_refusals_total{kind}`` metric). Pure: no reactor, the clock is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: Kinds of refusal (the ``kind`` label of the metric and the suffix of the event name).
KINDS = ("auth_failed", "forbidden", "rights_refused", "peer_refused", "tls_refused", "node_mismatch",
         "agent_without_cert")
EVENTS = {kind: f"security.{kind}" for kind in KINDS}
PER_WINDOW = 10
WINDOW_S = 60.0
#: Keys tracked at most; beyond, refusals from new peers share the key (kind, "*") until the next flush.
MAX_KEYS = 10000


@dataclass
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class SecurityEvents:
    """Logs and counts refusals, at most ``per_window`` log events per (kind, peer) and ``window`` seconds."""

    def __init__(self, clock: Callable[[], float], *, per_window: int = PER_WINDOW, window: float = WINDOW_S,
                 count: Callable[[str], None] | None = None, logger: Any = None) -> None:
        self.clock = clock
        self.per_window = per_window
        self.window = window
        self.count = count
        self.log = logger if logger is not None else log
        self.windows: dict[tuple[str, str], _Window] = {}
        self.counts: dict[str, int] = {}  # event name -> refusals ever, logged or not (tests, status)

    def refused(self, kind: str, peer: str, **fields: Any) -> bool:
        """Record one refusal of ``kind`` from ``peer`` (a host, not host:port); return whether it was logged.

        ``fields`` (never a secret) go into the logged event.
        """
        if self.count is not None:
            self.count(kind)
        event = EVENTS.get(kind, "security.refused")
        self.counts[event] = self.counts.get(event, 0) + 1
        now = self.clock()
        key = (kind, peer)
        window = self.windows.get(key)
        if window is not None and now - window.start >= self.window:
            self._close(key, window)
            window = None
        if window is None:
            if len(self.windows) >= MAX_KEYS:
                key = (kind, "*")
                window = self.windows.get(key)
            if window is None:
                window = self.windows[key] = _Window(now)
        if window.logged < self.per_window:
            window.logged += 1
            self.log.warning(event, peer=peer, kind=kind, **fields)
            return True
        window.suppressed += 1
        return False

    def flush(self) -> None:
        """Close the windows that ended: log one ``security.suppressed`` per key with suppressed refusals."""
        now = self.clock()
        for key, window in list(self.windows.items()):
            if now - window.start >= self.window:
                self._close(key, window)

    def _close(self, key: tuple[str, str], window: _Window) -> None:
        del self.windows[key]
        if window.suppressed:
            self.log.warning("security.suppressed", kind=key[0], peer=key[1], count=window.suppressed,
                             window=self.window)


def peer_host(peer: str) -> str:
    """Return the host part of ``host:port`` (the rate-limit key: a peer's port changes every connection)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer
