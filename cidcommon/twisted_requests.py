"""``PendingRequests`` (cidcommon.requests) for Twisted protocols: each request gets a Deferred and a reactor
timer. Used by cidd's sessions and by the agent; never by cidcapt (which has no reactor).

``after_reads`` confirms a timeout one turn of the reactor later: see its docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from cidcommon.requests import Pending, PendingRequests

Answer = dict[str, Any]
#: ``on_timeout(pending)``: called once a request's time is up; returns the exception its Deferred fails with.
OnTimeout = Callable[[Pending[Any]], BaseException]


def after_reads(clock: IReactorTime, action: Callable[..., object], *args: Any) -> None:
    """Run ``action(*args)`` at the next turn of the reactor, once it has read what waits on its sockets.

    A reactor runs its timers before it polls its sockets. After a long turn (a daemon busy with thousands of
    handshakes, or a simulated fleet with thousands of agents) a timeout can fire while the data that would have
    satisfied it sits unread in the kernel: a timeout confirmed this way (``action`` checks again) never blames
    a peer for this process's own slowness. With ``task.Clock`` it runs within the same ``advance``.
    """
    clock.callLater(0, action, *args)


class DeferredRequests:
    """Requests of one session: ``start`` returns the id and a Deferred; ``answer``/``fail`` settle it; a
    request not settled within its timeout fails with what ``on_timeout`` returns (which may also abort the
    connection); ``fail_all`` fails every waiting request when the session ends."""

    def __init__(self, clock: IReactorTime, on_timeout: OnTimeout, prefix: str | None = None) -> None:
        self._clock = clock
        self._on_timeout = on_timeout
        self.table: PendingRequests[tuple[Deferred[Answer], IDelayedCall | None]] = PendingRequests(prefix)

    def start(self, kind: str, timeout: float | None) -> tuple[Any, Deferred[Answer]]:
        """Record a request of ``kind``; return (its id, a Deferred firing with the answer)."""
        d: Deferred[Answer] = Deferred()
        request_id = self.table.new_id()
        deadline, timer = None, None
        if timeout is not None:
            deadline = self._clock.seconds() + timeout
            timer = self._clock.callLater(timeout, self._timed_out, request_id)
        self.table.add(kind, (d, timer), deadline, request_id)
        return request_id, d

    def waits_for(self, request_id: object) -> bool:
        """Return whether ``request_id`` names a waiting request."""
        return self.table.waits_for(request_id)

    def answer(self, request_id: object, message: Answer) -> bool:
        """Fire the request ``request_id`` with ``message``; return False when no such request waits."""
        pending = self._take(request_id)
        if pending is None:
            return False
        pending.waiter[0].callback(message)
        return True

    def fail(self, request_id: object, error: BaseException) -> Pending[Any] | None:
        """Fail the request ``request_id`` with ``error``; return it (None when no such request waits)."""
        pending = self._take(request_id)
        if pending is not None:
            pending.waiter[0].errback(error)
        return pending

    def fail_all(self, error: Callable[[Pending[Any]], BaseException]) -> None:
        """Fail every waiting request with ``error(pending)`` (the session ended)."""
        for pending in self.table.drain():
            self._cancel(pending)
            pending.waiter[0].errback(error(pending))

    def __len__(self) -> int:
        return len(self.table)

    def _take(self, request_id: object) -> Pending[Any] | None:
        pending = self.table.take(request_id)
        if pending is not None:
            self._cancel(pending)
        return pending

    @staticmethod
    def _cancel(pending: Pending[Any]) -> None:
        timer = pending.waiter[1]
        if timer is not None and timer.active():
            timer.cancel()

    def _timed_out(self, request_id: Any) -> None:
        """The request's time is up: fail it after the reactor read what waits (it may hold the answer)."""
        after_reads(self._clock, self._expire, request_id)

    def _expire(self, request_id: Any) -> None:
        """Fail the request ``request_id`` with ``on_timeout``'s error, unless it was answered meanwhile."""
        pending = self.table.take(request_id)
        if pending is not None:
            pending.waiter[0].errback(self._on_timeout(pending))
