"""Plain progress lines for logs (a Slurm prolog, a pipe): what is notable at once, a summary line now and then.

A person reads these lines after the fact (the prolog log, at 3 a.m.): a switch of 50 nodes must not bury the
one node that failed or hangs under 150 lines of normal transitions. So, on stderr:

- at once, one line per *notable* node event: a failure (with its reason), a climb to the next ladder rung
  (cidd gave up waiting for a reboot), an install attempt that is retried;
- every ``--summary-every`` seconds (default 30) while the capture runs, one summary line
  (``summary_line``): ready count, pending nodes per state, bytes and rate of the installs in progress, the
  time left, the nodes on a later ladder rung, and the nodes that did not move for ``--stall-after`` seconds;
- the final per-node summary (cidcapt.render.Renderer.summary), as before.

Nothing here writes: ``PlainFollower`` calls ``say`` with each line; time comes from ``ProgressModel.clock``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cidcapt.progress import Change, ProgressModel, Summary
from cidcommon.hostlists import collect

#: Node events that get a line of their own in plain mode and above the terminal view.
NOTABLE = frozenset({Change.FAILED, Change.CLIMBED, Change.RETRIED})


class Follower(Protocol):
    """What cidcapt.render.Renderer drives while a capture runs: plain lines, or the terminal view."""

    model: ProgressModel

    def node(self, event: Mapping[str, Any]) -> None:
        """A ``node`` event arrived."""

    def progress(self, event: Mapping[str, Any]) -> None:
        """A ``progress`` event arrived."""

    def tick(self) -> float | None:
        """Called while waiting; return the most seconds to wait before the next call (None: no limit)."""

    def line(self, text: str) -> bool:
        """Show a line that stays; return False when the caller must write it itself."""

    def close(self) -> None:
        """The wait is over: stop drawing (called again: nothing happens)."""


def duration(seconds: float) -> str:
    """Return a duration such as ``42s``, ``4m12s`` or ``1h05m`` (rounded down, never negative)."""
    whole = int(max(seconds, 0.0))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def size(count: float) -> str:
    """Return a byte count such as ``0 B``, ``512 B``, ``3.4 GiB`` (binary units, like ``--stats``)."""
    value, units = float(max(count, 0)), ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    unit = 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{value:.0f} {units[unit]}" if unit == 0 or value >= 10 else f"{value:.1f} {units[unit]}"


def change_line(event: Mapping[str, Any]) -> str:
    """Return the line of one node event: ``node03  installing -> failed  (reason)``."""
    detail = event.get("reason") or event.get("detail")
    text = f"{event.get('node')}  {event.get('from') or '-'} -> {event.get('to')}"
    return text + (f"  ({detail})" if detail else "")


def state_counts(summary: Summary) -> str:
    """Return the pending states with their counts: ``30 installing (1.2 GiB of 4.7 GiB, 410 MiB/s), 8 to_image``."""
    parts = []
    for state, count in summary.states.items():
        part = f"{count} {state}"
        if state == "installing" and summary.installs:
            rate = f", {size(summary.rate)}/s" if summary.rate is not None else ""
            part += f" ({size(summary.bytes_done)} of {size(summary.bytes_total)}{rate})"
        parts.append(part)
    if summary.failed:
        parts.append(f"{summary.failed} failed")
    return ", ".join(parts)


def summary_line(job: str, summary: Summary) -> str:
    """Return the periodic summary line (without the ``cidcapt:`` prefix), e.g.

    ``job 42: 12/50 ready, 30 installing (1.2 GiB of 4.7 GiB, 410 MiB/s), 8 to_installer; 2m30s elapsed,
    deadline in 57m30s; on ladder rung 1: sim0007; not moved for 3m00s+: sim[0007,0011]``
    """
    text = f"job {job}: {summary.ready}/{summary.total} ready"
    counts = state_counts(summary)
    text += f", {counts}" if counts else ""
    text += f"; {duration(summary.elapsed)} elapsed"
    if summary.deadline_left is not None:
        text += f", deadline in {duration(summary.deadline_left)}"
    rungs: dict[int, list[str]] = {}
    for wait in summary.ladder:
        rungs.setdefault(wait.rung, []).append(wait.node)
    for rung, names in sorted(rungs.items()):
        text += f"; on ladder rung {rung}: {collect(names)}"
    if summary.stalled:
        shortest = min(wait.seconds for wait in summary.stalled)
        text += f"; not moved for {duration(shortest)}+: {collect([wait.node for wait in summary.stalled])}"
    return text


class PlainFollower:
    """Plain lines: notable node events at once, ``summary_line`` every ``every`` seconds (Follower)."""

    def __init__(self, job: str, model: ProgressModel, say: Callable[[str], None], every: float,
                 quiet: bool = False) -> None:
        self.job = job
        self.model = model
        self.say = say
        self.every = every
        self.quiet = quiet
        self.next_at = model.clock() + every

    def node(self, event: Mapping[str, Any]) -> None:
        """Apply a node event; say it when it is notable (a failure, a ladder climb, a retried install)."""
        if self.model.node(event) in NOTABLE and not self.quiet:
            self.say(change_line(event))

    def progress(self, event: Mapping[str, Any]) -> None:
        """Apply a progress event (no line: the summary line carries the bytes)."""
        self.model.progress(event)

    def tick(self) -> float | None:
        """Say the summary line when it is due; return the seconds until the next one (None when quiet)."""
        if self.quiet:
            return None
        now = self.model.clock()
        if now >= self.next_at:
            self.say(summary_line(self.job, self.model.summary()))
            while self.next_at <= now:
                self.next_at += self.every
        return self.next_at - now

    def line(self, text: str) -> bool:
        """Return False: plain lines are written by the caller."""
        return False

    def close(self) -> None:
        """Nothing to stop."""
