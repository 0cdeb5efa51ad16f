"""The terminal view of a capture (stderr is a terminal, no --json, no --quiet): a live summary drawn with rich.

Imported only on that path (cidcapt.render.Renderer), so that a prolog's cidcapt never loads rich. The view is
redrawn in place every ``refresh`` seconds (sooner after a node state change, at most 10 times a second); lines
that must stay on screen (acceptance, failures, ladder climbs, retried installs, lost connections) are printed
above it. When the wait ends the view is drawn one last time and left on screen, and the final per-node summary
is written under it as plain lines.

What it shows, from cidcapt.progress.Summary::

    job 42 -> debian-12-1  ━━━━━━╸━━━━━━━━━━━━━━━━━  12/50 ready
      2m30s elapsed, deadline in 57m30s
      8 to_installer, 30 installing (1.2 GiB of 4.7 GiB, 410 MiB/s)
      slowest installs: sim0003 12% 8.0 MiB/s, sim0009 20% 10 MiB/s, sim0011 25% 11 MiB/s
      waiting longest: to_installer sim0007 4m12s
      ladder: sim0007 on rung 1 (to_installer) for 1m10s
      stalled: sim0007 in to_installer for 4m12s
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cidcapt.progress import Change, ProgressModel, Summary, Wait
from cidcapt.progress_text import NOTABLE, change_line, duration, size, state_counts
from cidcommon.hostlists import collect

#: How many nodes the view names per list (slowest installs, ladder, stalled); the rest are counted.
SHOWN = 3
#: The width of the bar of ready nodes, in columns.
BAR = 24
#: The shortest time between two drawings after node state changes (a switch of 2,000 nodes sends thousands).
MIN_REDRAW = 0.1


def _more(items: list[str], total: int) -> str:
    """Return ``items`` joined, with ``(and N more)`` when ``total`` is larger."""
    text = ", ".join(items)
    return text + (f" (and {total - len(items)} more)" if total > len(items) else "")


def view(job: str, image: str, summary: Summary) -> RenderableType:
    """Return the renderable of ``summary`` (the lines described in the module's docstring)."""
    head = Table.grid(padding=(0, 2))
    head.add_row(Text(f"job {job} -> {image}", style="bold", no_wrap=True),
                 ProgressBar(total=max(summary.total, 1), completed=summary.ready, width=BAR),
                 Text(f"{summary.ready}/{summary.total} ready", style="bold green", no_wrap=True))
    lines: list[RenderableType] = [head, Text(f"  {duration(summary.elapsed)} elapsed" + (
        f", deadline in {duration(summary.deadline_left)}" if summary.deadline_left is not None else ""))]
    counts = state_counts(summary)
    if counts:
        lines.append(Text("  " + counts))
    if summary.installs:
        slow = [f"{i.node} " + (f"{100 * i.done / i.total:.0f}% " if i.total else "")
                + (f"{size(i.rate)}/s" if i.rate is not None else size(i.done)) for i in summary.installs[:SHOWN]]
        lines.append(Text("  slowest installs: " + _more(slow, len(summary.installs))))
    waits = [f"{state} {summary.longest[state].node} {duration(summary.longest[state].seconds)}"
             for state in summary.states if state in summary.longest and state != "installing"]
    if waits:
        lines.append(Text("  waiting longest: " + ", ".join(waits)))
    if summary.ladder:
        rungs = [f"{w.node} on rung {w.rung} ({w.state}) for {duration(w.seconds)}" for w in summary.ladder[:SHOWN]]
        lines.append(Text("  ladder: " + _more(rungs, len(summary.ladder)), style="yellow"))
    if summary.stalled:
        lines.append(Text("  stalled: " + "; ".join(_stalled(summary.stalled)), style="bold red"))
    return Group(*lines)


def _stalled(waits: tuple[Wait, ...]) -> list[str]:
    """Return the stalled nodes per state, longest wait first: ``sim[07,11] in to_installer for 3m05s-4m12s``."""
    states: dict[str, list[Wait]] = {}
    for wait in waits:
        states.setdefault(wait.state, []).append(wait)
    texts = []
    for state, group in states.items():
        low, high = duration(min(w.seconds for w in group)), duration(max(w.seconds for w in group))
        texts.append(f"{collect([w.node for w in group])} in {state} for {high if low == high else f'{low}-{high}'}")
    return texts


class LiveFollower:
    """The live terminal view of a capture (cidcapt.progress_text.Follower)."""

    def __init__(self, job: str, image: str, model: ProgressModel, stderr: TextIO, refresh: float = 0.25) -> None:
        self.job = job
        self.image = image
        self.model = model
        self.refresh = refresh
        self.console = Console(file=stderr, highlight=False, markup=False, emoji=False)
        self.live: Live | None = Live(console=self.console, auto_refresh=False, redirect_stdout=False,
                                      redirect_stderr=False)
        self.live.start()
        self._drawn = float("-inf")
        self._draw()

    def _draw(self) -> None:
        """Redraw the view now."""
        if self.live is not None:
            self.live.update(view(self.job, self.image, self.model.summary()), refresh=True)
            self._drawn = self.model.clock()

    def node(self, event: Mapping[str, Any]) -> None:
        """Apply a node event: a line above the view when it is notable; redraw soon (a count changed)."""
        change = self.model.node(event)
        if change in NOTABLE:
            self.line(change_line(event))
        if change is not Change.SAME and self.model.clock() - self._drawn >= MIN_REDRAW:
            self._draw()

    def progress(self, event: Mapping[str, Any]) -> None:
        """Apply a progress event; redraw when the last drawing is older than ``refresh``."""
        self.model.progress(event)
        self.tick()

    def tick(self) -> float | None:
        """Redraw when due (ages and the deadline move on); return the seconds until the next redraw."""
        now = self.model.clock()
        if now - self._drawn >= self.refresh:
            self._draw()
        return max(self._drawn + self.refresh - now, 0.01)

    def line(self, text: str) -> bool:
        """Print ``cidcapt: text`` above the view; return True (False once closed: the caller writes it)."""
        if self.live is None:
            return False
        self.console.print(Text(f"cidcapt: {text}"), soft_wrap=True)
        return True

    def close(self) -> None:
        """Draw the view a last time, leave it on screen and give the terminal back (its cursor too)."""
        if self.live is not None:
            self._draw()
            live, self.live = self.live, None
            live.stop()
