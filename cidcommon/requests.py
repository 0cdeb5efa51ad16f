"""Request/response correlation, without I/O: the one place that chooses request ids and keeps the table of
requests waiting for their answer, with their deadlines.

Used by every side of the protocol (docs/protocol.md): cidd's sessions and cidkid's agent through
``cidcommon.twisted_requests`` (Deferreds and reactor timers), cidcapt's blocking client directly. No clock, no
socket, no reactor: callers pass the time in.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

W = TypeVar("W")


@dataclass(frozen=True)
class Pending(Generic[W]):
    """One request waiting for its answer: its ``id``, ``kind`` (message type), ``deadline`` (None: no limit)
    and ``waiter`` (whatever the caller resumes with the answer: a Deferred, a flag...)."""

    id: Hashable
    kind: str
    deadline: float | None
    waiter: W


class PendingRequests(Generic[W]):
    """Request ids and the requests waiting for an answer.

    Ids count up from 1 within one session, as strings ``"<prefix>N"`` when ``prefix`` is given (cidd's
    ``"c-N"``), else as whole numbers (the agent's and cidcapt's ``N``).
    """

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = prefix
        self._next = 1
        self._table: dict[Hashable, Pending[W]] = {}

    def new_id(self) -> Hashable:
        """Return the next request id (also for a request nobody waits for)."""
        number = self._next
        self._next += 1
        return number if self._prefix is None else f"{self._prefix}{number}"

    def add(self, kind: str, waiter: W, deadline: float | None = None,
            request_id: Hashable | None = None) -> Pending[W]:
        """Record a new request of ``kind`` waited for by ``waiter`` (under ``request_id``, taken earlier from
        ``new_id``, else a new one); return it: its ``id`` goes on the wire."""
        pending = Pending(self.new_id() if request_id is None else request_id, kind, deadline, waiter)
        self._table[pending.id] = pending
        return pending

    def take(self, request_id: object) -> Pending[W] | None:
        """Return and forget the request an answer with ``request_id`` belongs to (None when unknown or gone).

        Some peers echo an id as a string, others as a number: ``1`` and ``"1"`` name the same request.
        """
        key = self._key(request_id)
        return None if key is None else self._table.pop(key, None)

    def waits_for(self, request_id: object) -> bool:
        """Return whether a request with ``request_id`` is waiting (``1`` and ``"1"`` are the same id)."""
        return self._key(request_id) is not None

    def _key(self, request_id: object) -> Hashable | None:
        """Return the key of the waiting request ``request_id`` names, or None."""
        if request_id is None or not isinstance(request_id, Hashable):
            return None
        candidates: list[Hashable] = [request_id, str(request_id)]
        if isinstance(request_id, str) and request_id.isdigit():
            candidates.append(int(request_id))
        return next((key for key in candidates if key in self._table), None)

    def expired(self, now: float) -> list[Pending[W]]:
        """Return and forget the requests whose deadline is ``now`` or earlier, oldest first."""
        late = [p for p in self._table.values() if p.deadline is not None and p.deadline <= now]
        for pending in late:
            del self._table[pending.id]
        return late

    def next_deadline(self) -> float | None:
        """Return the earliest deadline of the waiting requests, or None."""
        deadlines = [p.deadline for p in self._table.values() if p.deadline is not None]
        return min(deadlines) if deadlines else None

    def drain(self) -> list[Pending[W]]:
        """Return and forget every waiting request (the session ended), oldest first."""
        pending = list(self._table.values())
        self._table.clear()
        return pending

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[Pending[W]]:
        return iter(list(self._table.values()))
