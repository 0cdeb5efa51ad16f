"""The heartbeat interval cidd gives its agents, and how long it waits before it declares one dead
(docs/protocol.md, "Heartbeats"): pure, no reactor.

With few agents every one beats every ``heartbeat`` seconds (the configured base, 10 s) and a session silent
for 3 intervals is dropped. With many, the interval grows so that cidd receives about ``heartbeat_rate``
heartbeats per second (each costs cidd a TLS round trip, about 0.17 ms of CPU on the 2-core reference machine:
docs/performance.md), up to ``HEARTBEAT_MAX``; the silence limit stays 3 intervals but never more than
``LIVENESS_MAX``, so a dead node is noticed within 55 s whatever the number of agents (an agent's heartbeat may
then be 15 s late at the longest interval). cidd tells the interval in its hello answer, and again in a
heartbeat's answer when it moved by ``RETELL`` or more since (agents that do not know the key keep theirs).
"""

from __future__ import annotations

#: The longest interval cidd gives (unless the configured base is longer).
HEARTBEAT_MAX = 40.0
#: A session silent for this many heartbeat intervals is dropped (cidd and the agent alike)...
SILENCE_FACTOR = 3
#: ... but cidd waits no longer than this (unless 3 x the configured base is longer).
LIVENESS_MAX = 55.0
#: An agent is told a new interval when it differs from the one it was told by this fraction or more.
RETELL = 0.1


def heartbeat_interval(sessions: int, base: float, rate: float) -> float:
    """Return the interval (seconds, one decimal) for ``sessions`` live agent sessions.

    ``base`` is the configured interval (the shortest given); ``rate`` the heartbeats per second cidd aims to
    stay under (0: always ``base``). The result never exceeds ``max(base, HEARTBEAT_MAX)``.
    """
    if rate <= 0 or sessions <= 0:
        return base
    return round(min(max(base, HEARTBEAT_MAX), max(base, sessions / rate)), 1)


def silence_limit(interval: float, base: float) -> float:
    """Return the seconds of silence after which cidd drops a session that was told ``interval`` (the longest
    told): 3 intervals, at most ``max(LIVENESS_MAX, 3 x base)``."""
    return min(SILENCE_FACTOR * interval, max(LIVENESS_MAX, SILENCE_FACTOR * base))


def worth_retelling(told: float, interval: float) -> bool:
    """Return whether ``interval`` differs enough from the interval ``told`` to an agent to tell it again."""
    return abs(interval - told) >= RETELL * told
