"""Reboot and power windows (as in Kadeploy): a bound on how many nodes reboot, or see their BMC, at once.

A ``Window`` is pure bookkeeping, no reactor: ``request(key, start)`` calls ``start`` at once when a slot is
free (or ``key`` already holds one) and otherwise queues it; ``release(key)`` frees the slot (or drops the
queued request) and starts the oldest waiting request. The engine decides what holding means: a node holds a
reboot slot from the moment its reboot is issued until it leaves the step (cidd/engine.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class Window:
    """At most ``limit`` holders at once (None: no bound); the others wait, first come first served."""

    def __init__(self, name: str, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"window {name} needs a limit >= 1, not {limit}")
        self.name = name
        self.limit = limit
        self._held: set[Hashable] = set()
        self._queue: OrderedDict[Hashable, Callable[[], None]] = OrderedDict()
        self.peak = 0  # highest number of holders seen

    @property
    def in_flight(self) -> int:
        """Return how many keys hold a slot."""
        return len(self._held)

    @property
    def waiting(self) -> int:
        """Return how many requests wait for a slot."""
        return len(self._queue)

    def holds(self, key: Hashable) -> bool:
        """Return whether ``key`` holds a slot."""
        return key in self._held

    def queued(self, key: Hashable) -> bool:
        """Return whether ``key`` waits for a slot."""
        return key in self._queue

    def request(self, key: Hashable, start: Callable[[], None]) -> bool:
        """Run ``start`` now if ``key`` holds or gets a slot, else queue it (replacing its earlier request).

        Returns whether ``start`` ran now.
        """
        if key not in self._held and (self.limit is not None and len(self._held) >= self.limit):
            self._queue[key] = start
            return False
        self._queue.pop(key, None)
        self._held.add(key)
        self.peak = max(self.peak, len(self._held))
        start()
        return True

    def release(self, key: Hashable) -> None:
        """Free ``key``'s slot (or drop its queued request), then start waiting requests while slots are free."""
        self._queue.pop(key, None)
        if key not in self._held:
            return
        self._held.discard(key)
        while self._queue and (self.limit is None or len(self._held) < self.limit):
            nxt, start = self._queue.popitem(last=False)
            self._held.add(nxt)
            self.peak = max(self.peak, len(self._held))
            start()
