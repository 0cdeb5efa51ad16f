"""Statistics of the event history: pure logic, fed rows (no SQLite, no reactor).

The history is the ``events`` table: one row per transition (docs/state-machine.md). Every figure here is
computed row by row, so that the roll-ups retention folds rows into (per period, and totals since the database
began) and the rows not folded yet add up to exactly the figures of the whole history:

- a **switch** ends with a row leaving a switching state (``to_installer``, ``installing``, ``to_image``) into
  ``ready`` (a success) or ``failed`` (a failure, classified by :func:`failure_kind`);
- a **phase duration** is the ``elapsed`` of a row leaving that phase for the next step (``to_installer`` to
  ``installing`` or ``ready``, ``installing`` to ``to_image``, ``to_image`` to ``ready``): the whole time in the
  phase, ladder climbs and install retries included. Phases that ended in a failure are not timed (their time
  is a timeout, counted under the failure);
- a **rung** counts each reboot wait (``to_installer``, ``to_image``) that a node left by booting, under the
  rung that got it there; ``fallback_saves`` are those where a rung above 0 did it, ``climbs`` the rows that
  went up the ladder;
- an **install** ends ``ok`` (``installing`` to ``to_image``), ``failed``, ``retried`` (a new attempt) or
  ``abandoned`` (the node left the installer); bytes installed are the catalog size of each image written, and
  the install rate is those bytes over the time the sized installs took.

Medians and 95th percentiles interpolate linearly between the ranked values (numpy's default, R's type 7).
Durations read from rows are exact; rolled-up ones are kept as counts in buckets 2 % wide, and count at the
geometric middle of their bucket (less than 1 % off). cidd.store reads the rows and roll-ups, cidd.history
picks which answer a query.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, NamedTuple

#: The timed phases of a switch, in their order.
PHASES = ("to_installer", "installing", "to_image")
#: The phases that wait for a reboot and climb the escalation ladder.
REBOOT_PHASES = frozenset({"to_installer", "to_image"})
#: What a phase is left for when it went well (anything else but a failure or itself is an abandoned step).
_NEXT = {"to_installer": frozenset({"installing", "ready"}), "installing": frozenset({"to_image"}),
         "to_image": frozenset({"ready"})}
#: Public view of the above: {phase: the states that end it well}, for queries that select timed rows.
TIMED: Mapping[str, frozenset[str]] = _NEXT
INSTALL_RESULTS = ("ok", "failed", "retried", "abandoned")

#: Width of a roll-up bucket: a value v falls in bucket floor(log(v) / log(RATIO)).
RATIO = 1.02
_LOG_RATIO = math.log(RATIO)
#: Values below this (seconds) share bucket ZERO_BUCKET, counted as 0.
MIN_VALUE = 0.001
ZERO_BUCKET = -1_000_000

#: Failure kinds, from the sentences of cidd/core/machine.py (first match wins). Also the ``reason`` label of
#: ``cid_failures_total``: a bounded set.
_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ladder_exhausted", re.compile(r"after every rung of the ladder")),
    ("wrong_image", re.compile(r"^node booted image .* instead of")),
    ("install_attempts_used", re.compile(r"install attempt\(s\) of .* were used")),
    ("install_timeout", re.compile(r"^install of .* did not finish within")),
    ("install_refused", re.compile(r"^the installer refused to install")),
    ("install_checksum", re.compile(r"^install of .* failed .*(checksum|sha256)", re.IGNORECASE)),
    ("install_disk_full", re.compile(r"^install of .* failed .*(no space|disk full|ENOSPC)", re.IGNORECASE)),
    ("install_download", re.compile(r"^install of .* failed .*(download|http|connection)", re.IGNORECASE)),
    ("install_failed", re.compile(r"^install of .* failed")),
)
FAILURE_KINDS = (*(kind for kind, _ in _KINDS), "other")


def timed(phase: str, to: str) -> bool:
    """Return whether a row from ``phase`` to ``to`` ends a phase that went on to the next step (it is timed)."""
    return to in _NEXT.get(phase, ())


def failure_kind(detail: str | None) -> str:
    """Return the kind of a failure from the reason the machine gave (one of FAILURE_KINDS)."""
    text = detail or ""
    for kind, pattern in _KINDS:
        if pattern.search(text):
            return kind
    return "other"


class Row(NamedTuple):
    """One row of the history as the statistics read it (the columns of ``events`` they need).

    ``detail`` may be None for rows that did not end in a failure (the query leaves it out).
    """

    ts: float
    node: str
    job: str | None
    image: str | None
    from_state: str
    to_state: str
    rung: int
    elapsed: float
    detail: str | None


# --- percentiles -------------------------------------------------------------------------------------------


def bucket_of(seconds: float) -> int:
    """Return the roll-up bucket of a duration (ZERO_BUCKET below MIN_VALUE)."""
    if seconds < MIN_VALUE:
        return ZERO_BUCKET
    return math.floor(math.log(seconds) / _LOG_RATIO)


def bucket_value(bucket: int) -> float:
    """Return the value a bucket counts as: the geometric middle of its bounds (0 for ZERO_BUCKET)."""
    if bucket == ZERO_BUCKET:
        return 0.0
    return math.exp((bucket + 0.5) * _LOG_RATIO)


def quantile(pairs: Sequence[tuple[float, int]], q: float) -> float | None:
    """Return the ``q`` quantile (0..1) of weighted values ``(value, count)``, or None when there are none.

    Linear interpolation between ranked values (type 7): the values are ranked 0..n-1 and the quantile sits at
    rank (n - 1) * q.
    """
    ranked = sorted((value, count) for value, count in pairs if count > 0)
    total = sum(count for _, count in ranked)
    if total == 0:
        return None
    position = (total - 1) * q
    low_rank = math.floor(position)
    fraction = position - low_rank
    low = _at_rank(ranked, low_rank)
    if fraction == 0.0:
        return low
    return low + fraction * (_at_rank(ranked, low_rank + 1) - low)


def _at_rank(ranked: Sequence[tuple[float, int]], rank: int) -> float:
    """Return the value at 0-based ``rank`` of the weighted, sorted values."""
    seen = 0
    for value, count in ranked:
        seen += count
        if rank < seen:
            return value
    return ranked[-1][0]


@dataclass
class Digest:
    """The durations of one phase: exact values (rows still kept) and bucket counts (rolled-up rows)."""

    values: list[float] = field(default_factory=list)
    buckets: dict[int, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Return how many durations the digest holds."""
        return len(self.values) + sum(self.buckets.values())

    def merge(self, other: Digest) -> None:
        """Add the durations of ``other``."""
        self.values.extend(other.values)
        buckets = self.buckets
        for bucket, count in other.buckets.items():
            buckets[bucket] = buckets.get(bucket, 0) + count

    def quantile(self, q: float) -> float | None:
        """Return the ``q`` quantile of the durations (see :func:`quantile`), or None when empty."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> list[float | None]:
        """Return the quantiles ``qs`` of the durations (linear interpolation, as :func:`quantile`), sorting once.

        Exact values and buckets are ranked together; a bucket counts as its middle value.
        """
        values = sorted(self.values)
        buckets = sorted(item for item in self.buckets.items() if item[1] > 0)
        if not values and buckets:
            return self._bucket_quantiles(buckets, qs)
        total = len(values) + sum(count for _, count in buckets)
        if total == 0:
            return [None] * len(qs)
        out: list[float | None] = []
        for q in qs:
            position = (total - 1) * q
            low_rank = math.floor(position)
            low = _ranked(values, buckets, low_rank)
            fraction = position - low_rank
            out.append(low if fraction == 0.0 else low + fraction * (_ranked(values, buckets, low_rank + 1) - low))
        return out

    @staticmethod
    def _bucket_quantiles(buckets: Sequence[tuple[int, int]], qs: Sequence[float]) -> list[float | None]:
        """Return the quantiles ``qs`` of sorted ``(bucket, count)`` pairs alone (cumulative counts, bisected)."""
        cumulative = list(accumulate(count for _, count in buckets))
        total = cumulative[-1]

        def at(rank: int) -> float:
            return bucket_value(buckets[bisect.bisect_right(cumulative, rank)][0])

        out: list[float | None] = []
        for q in qs:
            position = (total - 1) * q
            low_rank = math.floor(position)
            low = at(low_rank)
            fraction = position - low_rank
            out.append(low if fraction == 0.0 else low + fraction * (at(low_rank + 1) - low))
        return out

    def rolled(self) -> dict[int, int]:
        """Return every duration as bucket counts (what a roll-up keeps)."""
        if not self.values:
            return self.buckets
        buckets = dict(self.buckets)
        for value in self.values:
            bucket = bucket_of(value)
            buckets[bucket] = buckets.get(bucket, 0) + 1
        return buckets


def _ranked(values: Sequence[float], buckets: Sequence[tuple[int, int]], rank: int) -> float:
    """Return the value at 0-based ``rank`` of sorted exact ``values`` and sorted ``(bucket, count)`` together."""
    if not buckets:
        return values[rank]
    taken = start = 0
    for bucket, count in buckets:
        if values:
            end = bisect.bisect_left(values, bucket_value(bucket), start)  # exact values below this bucket
            if rank < taken + end - start:
                return values[start + rank - taken]
            taken += end - start
            start = end
        if rank < taken + count:
            return bucket_value(bucket)
        taken += count
    return values[min(start + rank - taken, len(values) - 1)]


# --- figures -----------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What the statistics count for one node, image, group, roll-up period or the whole cluster."""

    switches: int = 0
    ok: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    rungs: dict[str, int] = field(default_factory=dict)
    fallback_saves: int = 0
    climbs: int = 0
    installs: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    sized_install_s: float = 0.0
    phases: dict[str, Digest] = field(default_factory=dict)
    last_failure: tuple[float, str] | None = None  # (ts, reason)
    first_ts: float | None = None
    last_ts: float | None = None

    def add(self, row: Row, size: int | None) -> None:
        """Count one history row; ``size`` is the catalog size of the row's image in bytes (None: unknown)."""
        phase, to = row.from_state, row.to_state
        if phase not in _NEXT:
            return
        self.tally(phase, to, row.rung, 1, row.elapsed, row.ts, row.ts, size)
        if to in _NEXT[phase]:
            self.phases.setdefault(phase, Digest()).values.append(row.elapsed)
        elif to == "failed":
            self.failure(row.ts, row.detail)

    def tally(self, phase: str, to: str, rung: int, count: int, elapsed: float, first: float, last: float,
              size: int | None) -> None:
        """Count ``count`` rows from ``phase`` to ``to`` at ``rung`` whose elapsed times add up to ``elapsed`` and
        whose times span [first, last]: everything but the durations themselves and the failures' reasons
        (:meth:`add` and :meth:`failure` count those)."""
        if phase not in _NEXT:
            return
        self.first_ts = first if self.first_ts is None else min(self.first_ts, first)
        self.last_ts = last if self.last_ts is None else max(self.last_ts, last)
        if to == phase:
            if phase == "installing":
                _bump(self.installs, "retried", count)
            else:
                self.climbs += count
            return
        if to in _NEXT[phase] and phase in REBOOT_PHASES:
            _bump(self.rungs, str(rung), count)
            if rung > 0:
                self.fallback_saves += count
        if phase == "installing":
            result = "ok" if to == "to_image" else "failed" if to == "failed" else "abandoned"
            _bump(self.installs, result, count)
            if result == "ok" and size is not None:
                self.bytes += size * count
                self.sized_install_s += elapsed
        if to == "ready":
            self.switches += count
            self.ok += count
        elif to == "failed":
            self.switches += count
            self.failed += count

    def failure(self, ts: float, detail: str | None) -> None:
        """Count the reason of one switch that failed at ``ts`` (its row is counted by :meth:`tally`)."""
        _bump(self.reasons, failure_kind(detail))
        if self.last_failure is None or ts >= self.last_failure[0]:
            self.last_failure = (ts, detail or "")

    def merge(self, other: Figures) -> None:
        """Add every count of ``other`` to these figures."""
        self.switches += other.switches
        self.ok += other.ok
        self.failed += other.failed
        for mine, theirs in ((self.reasons, other.reasons), (self.rungs, other.rungs),
                             (self.installs, other.installs)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.fallback_saves += other.fallback_saves
        self.climbs += other.climbs
        self.bytes += other.bytes
        self.sized_install_s += other.sized_install_s
        phases = self.phases
        for phase, digest in other.phases.items():
            own = phases.get(phase)
            if own is None:
                phases[phase] = Digest(list(digest.values), dict(digest.buckets))
            else:
                own.merge(digest)
        if other.last_failure is not None and (self.last_failure is None
                                               or other.last_failure[0] >= self.last_failure[0]):
            self.last_failure = other.last_failure
        if other.first_ts is not None and (self.first_ts is None or other.first_ts < self.first_ts):
            self.first_ts = other.first_ts
        if other.last_ts is not None and (self.last_ts is None or other.last_ts > self.last_ts):
            self.last_ts = other.last_ts

    def to_row(self) -> tuple[Any, ...]:
        """Return the figures as the data columns of a roll-up row (ROLLUP_COLUMNS; durations as bucket counts)."""
        counts = {key: value for key, value in (("reasons", self.reasons), ("rungs", self.rungs),
                                                ("installs", self.installs)) if value}
        last = self.last_failure or (None, None)
        return (self.switches, self.ok, self.failed, self.fallback_saves, self.climbs, self.bytes,
                self.sized_install_s, self.first_ts, self.last_ts, last[0], last[1],
                json.dumps(counts, separators=(",", ":")), encode_histograms(self.phases))

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Figures:
        """Return the figures that the data columns of a roll-up row (:meth:`to_row`) hold."""
        (switches, ok, failed, saves, climbs, size, install_s, first, last, failure_ts, reason, counts,
         histograms) = row
        counted = json.loads(counts) if counts != "{}" else {}
        return cls(switches=switches, ok=ok, failed=failed, reasons=counted.get("reasons", {}),
                   rungs=counted.get("rungs", {}), fallback_saves=saves, climbs=climbs,
                   installs=counted.get("installs", {}), bytes=size, sized_install_s=install_s,
                   phases=decode_histograms(histograms),
                   last_failure=(failure_ts, reason) if failure_ts is not None else None, first_ts=first,
                   last_ts=last)

    def summary(self) -> dict[str, Any]:
        """Return the figures for people and programs: rates, medians and 95th percentiles (seconds)."""
        phases = {}
        for phase in PHASES:
            digest = self.phases.get(phase, Digest())
            median, p95 = digest.quantiles((0.5, 0.95))
            phases[phase] = {"count": digest.count, "median": _round(median), "p95": _round(p95)}
        last = None
        if self.last_failure is not None:
            last = {"ts": self.last_failure[0], "reason": self.last_failure[1],
                    "kind": failure_kind(self.last_failure[1])}
        return {
            "switches": self.switches, "ok": self.ok, "failed": self.failed,
            "success_rate": round(self.ok / self.switches, 4) if self.switches else None,
            "failures": dict(sorted(self.reasons.items(), key=lambda item: (-item[1], item[0]))),
            "rungs": dict(sorted(self.rungs.items(), key=lambda item: int(item[0]))),
            "fallback_saves": self.fallback_saves, "climbs": self.climbs,
            "installs": {result: self.installs.get(result, 0) for result in INSTALL_RESULTS},
            "phases": phases, "bytes": self.bytes,
            "install_rate": round(self.bytes / self.sized_install_s, 1) if self.sized_install_s > 0 else None,
            "last_failure": last, "first": self.first_ts, "last": self.last_ts,
        }


#: The data columns of a roll-up row, in the order of Figures.to_row.
ROLLUP_COLUMNS = ("switches", "ok", "failed", "fallback_saves", "climbs", "bytes", "sized_install_s", "first_ts",
                  "last_ts", "failure_ts", "failure_reason", "counts", "histograms")


def encode_histograms(phases: Mapping[str, Digest]) -> bytes:
    """Return the durations of ``phases`` as bucket counts, packed: for each of PHASES, n, n buckets, n counts
    (32-bit integers in the machine's order; the database stays on the head node that wrote it)."""
    packed = array("i")
    for phase in PHASES:
        digest = phases.get(phase)
        counts = digest.rolled() if digest is not None else {}
        buckets = sorted(counts)
        packed.append(len(buckets))
        packed.extend(buckets)
        packed.extend(map(counts.__getitem__, buckets))
    return packed.tobytes()


def decode_histograms(blob: bytes) -> dict[str, Digest]:
    """Return the phases' durations (as bucket counts) packed by :func:`encode_histograms`."""
    packed = array("i")
    packed.frombytes(blob)
    numbers = packed.tolist()
    phases: dict[str, Digest] = {}
    at = 0
    for phase in PHASES:
        size = numbers[at]
        if size:
            phases[phase] = Digest(buckets=dict(zip(numbers[at + 1:at + 1 + size],
                                                    numbers[at + 1 + size:at + 1 + 2 * size], strict=True)))
        at += 1 + 2 * size
    return phases


def _bump(counts: dict[str, int], key: str, count: int = 1) -> None:
    counts[key] = counts.get(key, 0) + count


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --- roll-ups and reports ----------------------------------------------------------------------------------


#: A roll-up row's key: (period start, node, image, group). The totals since the database began have period
#: TOTAL; a node's figures over every image have image ALL, an image's (and group's) over every node node ALL.
RollupKey = tuple[float, str, str, str]
TOTAL = -1.0
ALL = "*"


def period_of(ts: float, period: float) -> float:
    """Return the start of the roll-up period of ``period`` seconds holding ``ts`` (periods start at 0 UTC)."""
    return math.floor(ts / period) * period


def roll_up(rows: Iterable[Row], period: float, sizes: Mapping[str, int | None],
            groups: Mapping[str, str]) -> dict[RollupKey, Figures]:
    """Return what ``rows`` add to each roll-up row, for their period and for the totals (TOTAL): per (node, image),
    per node (image ALL) and per (image, group) (node ALL); ``groups`` maps nodes to their group (absent:
    ``default``). A query without a selection reads the per-node and per-(image, group) rows only."""
    cells: dict[RollupKey, Figures] = {}
    for row in rows:
        if row.from_state not in _NEXT:
            continue
        key = (period_of(row.ts, period), row.node, row.image or "", groups.get(row.node, "default"))
        figures = cells.get(key)
        if figures is None:
            figures = cells[key] = Figures()
        figures.add(row, sizes.get(row.image or ""))
    rolled = dict(cells)
    for (start, node, image, group), figures in cells.items():
        for key in ((start, node, ALL, group), (start, ALL, image, group), (TOTAL, node, image, group),
                    (TOTAL, node, ALL, group), (TOTAL, ALL, image, group)):
            _get(rolled, key).merge(figures)
    return rolled


@dataclass(frozen=True)
class Rollup:
    """One roll-up row: the figures of a node (or ALL) and an image (or ALL) over a period (or TOTAL)."""

    period: float
    node: str
    image: str
    group: str
    figures: Figures


class Tally(NamedTuple):
    """Rows of the history counted together by the query: same node, image, phase left, state reached and rung."""

    node: str
    image: str | None
    from_state: str
    to_state: str
    rung: int
    rows: int
    elapsed: float  # their elapsed times added up
    first: float  # the earliest and latest of their times
    last: float


class Duration(NamedTuple):
    """The time a node spent in a phase it left for the next step (see :func:`timed`)."""

    node: str
    image: str | None
    phase: str
    elapsed: float


class Failure(NamedTuple):
    """A switch that failed: when, where, and the machine's reason."""

    ts: float
    node: str
    image: str | None
    detail: str | None


Cell = tuple[str, str, str]  # (node, image ("" when none), group)


@dataclass
class Report:
    """Figures by node, image and group, and for everything selected.

    Rows (or the query's tallies, durations and failures) and roll-ups are counted by cell (node, image, group);
    :meth:`finish` adds the cells up into nodes and into (image, group) pairs, and the pairs into images, groups
    and the total. The totals per node (image ALL) and per pair (node ALL) count only towards nodes or pairs.
    """

    total: Figures = field(default_factory=Figures)
    nodes: dict[str, Figures] = field(default_factory=dict)
    images: dict[str, Figures] = field(default_factory=dict)
    groups: dict[str, Figures] = field(default_factory=dict)
    cells: dict[Cell, Figures] = field(default_factory=dict)
    node_parts: dict[str, list[Figures]] = field(default_factory=dict)
    pair_parts: dict[tuple[str, str], list[Figures]] = field(default_factory=dict)

    def _cell(self, node: str, image: str | None, groups: Mapping[str, str]) -> Figures:
        return _get(self.cells, (node, image or "", groups.get(node, "default")))

    def add_rows(self, rows: Iterable[Row], groups: Mapping[str, str], sizes: Mapping[str, int | None]) -> None:
        """Count history rows; ``groups`` maps nodes to their group (absent: ``default``)."""
        for row in rows:
            if row.from_state in _NEXT:
                self._cell(row.node, row.image, groups).add(row, sizes.get(row.image or ""))

    def add_tallies(self, tallies: Iterable[Tally], groups: Mapping[str, str],
                    sizes: Mapping[str, int | None]) -> None:
        """Count the query's tallies (the same figures as the rows they stand for, but durations and reasons)."""
        for t in tallies:
            self._cell(t.node, t.image, groups).tally(t.from_state, t.to_state, t.rung, t.rows, t.elapsed, t.first,
                                                      t.last, sizes.get(t.image or ""))

    def add_durations(self, durations: Iterable[Duration], groups: Mapping[str, str]) -> None:
        """Count the durations of phases that went on (rows for which :func:`timed` holds)."""
        cells: dict[tuple[str, str | None], Figures] = {}
        for d in durations:
            figures = cells.get((d.node, d.image))
            if figures is None:
                figures = cells[(d.node, d.image)] = self._cell(d.node, d.image, groups)
            digest = figures.phases.get(d.phase)
            if digest is None:
                digest = figures.phases[d.phase] = Digest()
            digest.values.append(d.elapsed)

    def add_failures(self, failures: Iterable[Failure], groups: Mapping[str, str]) -> None:
        """Count the reasons of the switches that failed."""
        for f in failures:
            self._cell(f.node, f.image, groups).failure(f.ts, f.detail)

    def add_rollups(self, rollups: Iterable[Rollup]) -> None:
        """Count roll-up rows: one per node and image as a cell; a node's totals (image ALL) towards that node
        only, an image's (node ALL) towards its (image, group) pair only."""
        cells = self.cells
        for r in rollups:
            if r.image == ALL:
                self.node_parts.setdefault(r.node, []).append(r.figures)
            elif r.node == ALL:
                self.pair_parts.setdefault((r.image or "-", r.group), []).append(r.figures)
            else:
                key = (r.node, r.image, r.group)
                found = cells.get(key)
                if found is None:
                    cells[key] = r.figures
                else:
                    found.merge(r.figures)

    def finish(self) -> Report:
        """Add the counted parts up into the node, image, group and total figures; return the report.

        A figure made of one part takes that part as it is (no copy): the parts are not used after this.
        """
        pairs, by_node = self.pair_parts, self.node_parts
        for (node, image, group), figures in self.cells.items():
            pairs.setdefault((image or "-", group), []).append(figures)
            by_node.setdefault(node, []).append(figures)
        pair_figures = {key: _merged(parts, copy=True) for key, parts in pairs.items()}  # cells stay intact
        self.nodes = {node: _merged(parts) for node, parts in by_node.items()}
        by_image: dict[str, list[Figures]] = {}
        by_group: dict[str, list[Figures]] = {}
        for (image, group), figures in pair_figures.items():
            by_image.setdefault(image, []).append(figures)
            by_group.setdefault(group, []).append(figures)
        self.groups = {group: _merged(parts, copy=True) for group, parts in by_group.items()}
        self.total = _merged(list(pair_figures.values()), copy=True)
        self.images = {image: _merged(parts) for image, parts in by_image.items()}  # last: it may take pairs as is
        self.cells, self.node_parts, self.pair_parts = {}, {}, {}
        return self


def _merged(parts: list[Figures], copy: bool = False) -> Figures:
    """Return the sum of ``parts``: the only part itself unless ``copy``, else a new Figures."""
    if len(parts) == 1 and not copy:
        return parts[0]
    total = Figures()
    for part in parts:
        total.merge(part)
    return total


def _get(table: dict[Any, Figures], key: Any) -> Figures:
    figures = table.get(key)
    if figures is None:
        figures = table[key] = Figures()
    return figures


def failure_rate(figures: Figures) -> float:
    """Return the share of switches that failed (0 when there were none)."""
    return figures.failed / figures.switches if figures.switches else 0.0


def worst_nodes(nodes: Mapping[str, Figures], count: int) -> list[str]:
    """Return up to ``count`` nodes that failed at least once, worst first.

    Worst means the highest failure rate, then the most failures, then the latest failure; ties by name.
    """
    failing = [name for name, figures in nodes.items() if figures.failed]
    failing.sort(key=lambda name: (-failure_rate(nodes[name]), -nodes[name].failed,
                                   -(nodes[name].last_failure or (0.0, ""))[0], name))
    return failing[:count]


def render(report: Report, worst: int | None = None) -> dict[str, Any]:
    """Return the JSON form of a report (docs/protocol.md, ``stats``).

    ``nodes`` lists every node by name, or with ``worst`` only the ``worst`` nodes by failure rate, worst first
    (:func:`worst_nodes`).
    """
    names = worst_nodes(report.nodes, worst) if worst is not None else sorted(report.nodes)
    return {
        "total": report.total.summary(),
        "nodes": [{"node": name, **report.nodes[name].summary()} for name in names],
        "images": [{"image": name, **report.images[name].summary()} for name in sorted(report.images)],
        "groups": [{"group": name, **report.groups[name].summary()} for name in sorted(report.groups)],
    }
