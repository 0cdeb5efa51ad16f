"""The event history read back: statistics (``stats`` requests, ``/stats``) and retention (a timer).

Statistics are computed by cidd.core.stats from the rows cidd.store selects, in a thread of their own with a
read-only connection (WAL: the engine's commits go on meanwhile), and kept for a few seconds. Retention runs on
the reactor every ``retention.interval`` seconds, in batches of ``retention.batch`` rows, each one transaction:
first it folds the new events into the roll-ups (per period, node and image, and totals per node and image),
then it deletes the events older than ``retention.events_days`` or beyond ``retention.max_events`` (all rolled
up by then), then the roll-ups of periods older than ``retention.rollups_days`` (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool

from cidcommon import hostlists
from cidcommon.errors import BadRequest
from cidd.core.captures import Capture
from cidd.core.machine import SWITCHING, Step
from cidd.core.stats import Report, Row, render, roll_up
from cidd.engine import Engine
from cidd.metrics import Metrics
from cidd.store import Store, history_rows, oldest_event, open_reader, rolled_upto, rollup_rows, rollup_totals

log = structlog.get_logger("cidd.history")

DAY = 86400.0
#: A result is reused for this long, and for up to STALE_S when no switch ended since it was computed.
FRESH_S = 5.0
STALE_S = 60.0
#: The most nodes ``worst`` may ask for.
MAX_WORST = 10_000

Run = Callable[..., "Deferred[Any]"]


@dataclass(frozen=True)
class StatsQuery:
    """What a ``stats`` request selects (docs/protocol.md): a time range [since, until), nodes, image, job."""

    since: float | None = None
    until: float | None = None
    nodes: tuple[str, ...] | None = None
    image: str | None = None
    job: str | None = None
    worst: int | None = None


def parse_query(fields: Mapping[str, Any]) -> StatsQuery:
    """Return the StatsQuery of a ``stats`` request's fields.

    Raises BadRequest (a wrong field) or BadHostlist (``nodes`` does not parse).
    """
    numbers: dict[str, float | None] = {}
    for key in ("since", "until"):
        value = fields.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadRequest(f"'{key}' must be a Unix time in seconds (got {value!r})")
        numbers[key] = float(value) if value is not None else None
    texts: dict[str, str | None] = {}
    for key in ("nodes", "image", "job"):
        value = fields.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise BadRequest(f"'{key}' must be a non-empty string (got {value!r})")
        texts[key] = value
    worst = fields.get("worst")
    if worst is not None and (isinstance(worst, bool) or not isinstance(worst, int) or not 1 <= worst <= MAX_WORST):
        raise BadRequest(f"'worst' must be a whole number from 1 to {MAX_WORST} (got {worst!r})")
    since, until = numbers["since"], numbers["until"]
    if since is not None and until is not None and until <= since:
        raise BadRequest(f"'until' ({until:g}) must be after 'since' ({since:g})")
    nodes = tuple(hostlists.expand(texts["nodes"])) if texts["nodes"] else None
    return StatsQuery(since=since, until=until, nodes=nodes, image=texts["image"], job=texts["job"], worst=worst)


def query_from_args(args: Mapping[bytes, list[bytes]]) -> StatsQuery:
    """Return the StatsQuery of an HTTP query string (``/stats?since=...&nodes=...&worst=10``).

    Raises BadRequest or BadHostlist.
    """
    fields: dict[str, Any] = {}
    for key in ("since", "until", "nodes", "image", "job", "worst"):
        values = args.get(key.encode())
        if not values:
            continue
        text = values[-1].decode("utf-8", "replace")
        if key in ("since", "until", "worst"):
            try:
                fields[key] = int(text) if key == "worst" else float(text)
            except ValueError:
                raise BadRequest(f"'{key}' must be a number (got {text!r})") from None
        else:
            fields[key] = text
    return parse_query(fields)


def compute_stats(path: Path | str, query: StatsQuery, groups: Mapping[str, str], sizes: Mapping[str, int | None],
                  period: float) -> dict[str, Any]:
    """Return the statistics ``query`` asks for, read from the database at ``path`` (runs in any thread).

    Where the figures come from (``source`` in the result):

    - ``events``: a ``job``, or a range that starts within the events still kept, is counted from the events
      alone (durations exact);
    - ``totals``: no range: the totals rolled up since the database began, plus the events not rolled up yet;
    - ``periods``: a range that starts before the oldest kept event: the roll-up periods that overlap it, plus
      the events in it not rolled up yet.

    Raises StoreError when the database cannot be read.
    """
    db = open_reader(path)
    try:
        db.execute("BEGIN")  # one read transaction: events and roll-ups as they were at one moment
        oldest, upto = oldest_event(db), rolled_upto(db)
        select = {"nodes": query.nodes, "image": query.image}
        if query.job is not None or (query.since is not None and oldest is not None and query.since >= oldest):
            source, rollups, after = "events", [], None
        elif query.since is None and query.until is None:
            source, rollups, after = "totals", rollup_totals(db, **select), upto
        else:
            source, after = "periods", upto
            rollups = rollup_rows(db, period, since=query.since, until=query.until, **select)
        rows = history_rows(db, since=query.since, until=query.until, job=query.job, after=after, **select)
    finally:
        db.close()
    report = Report()
    report.add_tallies(rows.tallies, groups, sizes)
    report.add_durations(rows.durations, groups)
    report.add_failures(rows.failures, groups)
    report.add_rollups(rollups)
    body = render(report.finish(), query.worst)
    body["query"] = {key: value for key, value in asdict(query).items() if value is not None}
    if query.nodes is not None:
        body["query"]["nodes"] = hostlists.collect(list(query.nodes))
    body["source"] = source
    body["events_since"] = oldest
    body["rollup_days"] = period / DAY
    return body


def thread_pool_runner(reactor: Any) -> Run:
    """Return a ``Run`` calling a function in the reactor's thread pool (a Deferred firing in the reactor)."""
    def run(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)
    return run


class History:
    """Statistics and retention of one cidd's event history; also an engine observer (switch ends)."""

    def __init__(self, engine: Engine, store: Store, run: Run, clock: IReactorTime,
                 metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.store = store
        self.run = run
        self.clock = clock
        self.settings = engine.config.retention
        self.period = self.settings.period_days * DAY
        self._generation = 0  # switch ends seen: a cached result older than the last end is stale sooner
        self._cache: dict[StatsQuery, tuple[float, int, dict[str, Any]]] = {}
        self._waiting: dict[StatsQuery, list[Deferred[dict[str, Any]]]] = {}
        self._loop: LoopingCall | None = None
        self._next: IDelayedCall | None = None
        self._done: Deferred[None] | None = None
        self._counts = {"rolled": 0, "deleted": 0}
        self._rolled_counter = metrics.counter("cid_history_rolled_up_total",
                                               "Events folded into the roll-ups by retention.") \
            if metrics is not None else None
        self._rows_gauge = metrics.gauge("cid_history_rows", "Rows of the event history by table.", ("table",)) \
            if metrics is not None else None

    # --- engine observer ---

    def transition(self, step: Step, now: float) -> None:
        """Note that a switch ended (cached statistics become stale sooner)."""
        t = step.transition
        if t is not None and t.from_state in {s.value for s in SWITCHING} and t.to_state in ("ready", "failed"):
            self._generation += 1

    def capture_ended(self, capture: Capture, now: float) -> None:
        """Nothing to do: the statistics count nodes, not captures."""

    def progress(self, name: str, message: dict[str, Any]) -> None:
        """Nothing to do: progress is not history."""

    # --- statistics ---

    def stats(self, query: StatsQuery) -> Deferred[dict[str, Any]]:
        """Return a Deferred firing with the statistics ``query`` asks for (docs/protocol.md, ``stats``).

        The same query asked again within FRESH_S seconds (STALE_S when no switch ended meanwhile) gets the same
        result; one asked while it is being computed waits for that computation. Fails with StoreError.
        """
        now = self.clock.seconds()
        cached = self._cache.get(query)
        if cached is not None:
            at, generation, body = cached
            if now - at < FRESH_S or (generation == self._generation and now - at < STALE_S):
                return succeed(body)
        waiting = self._waiting.get(query)
        if waiting is not None:
            d: Deferred[dict[str, Any]] = Deferred()
            waiting.append(d)
            return d
        self._waiting[query] = []
        generation = self._generation
        catalog = self.engine.catalog
        sizes = {image_id: catalog.images[image_id].size for image_id in catalog}
        started = self.clock.seconds()

        def done(body: dict[str, Any]) -> dict[str, Any]:
            self._cache = {q: entry for q, entry in self._cache.items() if now - entry[0] < STALE_S}
            self._cache[query] = (now, generation, body)
            log.debug("history.stats", seconds=round(self.clock.seconds() - started, 3),
                      nodes=len(body["nodes"]), query=body["query"])
            for other in self._waiting.pop(query, []):
                other.callback(body)
            return body

        def failed(failure: Any) -> Any:
            for other in self._waiting.pop(query, []):
                other.errback(failure)
            return failure

        d = self.run(compute_stats, self.store.path, query, dict(self.engine.groups), sizes, self.period)
        return d.addCallbacks(done, failed)

    # --- retention ---

    def start(self) -> None:
        """Run retention now (in batches) and then every ``retention.interval`` seconds."""
        self._loop = LoopingCall(self.retain)
        self._loop.clock = self.clock
        self._loop.start(self.settings.interval, now=True).addErrback(
            lambda failure: log.error("history.retention_stopped", error=failure.getErrorMessage()))

    def stop(self) -> None:
        """Stop the timer and any batch still to come (a batch is one transaction: none is half done)."""
        if self._next is not None and self._next.active():
            self._next.cancel()
            self._next = None
            if self._done is not None and not self._done.called:
                self._done.callback(None)  # the run ends here; the next start folds the rest
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def retain(self) -> Deferred[None]:
        """Fold the new events into the roll-ups, delete the events retention removes, drop old roll-ups.

        One batch (one transaction) per reactor turn; returns a Deferred firing when the last one is done. A
        failure is logged and the next run tries again.
        """
        done: Deferred[None] = Deferred()
        self._counts = {"rolled": 0, "deleted": 0}
        self._done = done
        self._batch(done)
        return done

    def _batch(self, done: Deferred[None]) -> None:
        """Run one batch of retention; schedule the next one, or finish."""
        self._next = None
        now = self.clock.seconds()
        settings, counts = self.settings, self._counts
        try:
            batch = self.store.events_to_roll_up(settings.batch)
            if batch:
                self._roll_up(batch)
                counts["rolled"] += len(batch)
            deleted = 0 if len(batch) == settings.batch else self.store.delete_events(
                now - settings.events_days * DAY, settings.max_events, settings.batch)
            counts["deleted"] += deleted
            if len(batch) == settings.batch or deleted == settings.batch:
                self._next = self.clock.callLater(0, self._batch, done)
                return
            dropped = self.store.drop_rollups(now - settings.rollups_days * DAY)
            events, rollups = self.store.history_size()
        except Exception:  # logged; the next run (retention.interval) tries again
            log.exception("history.retention_failed", **counts)
            done.callback(None)
            return
        if self._rows_gauge is not None:
            self._rows_gauge.labels(table="events").set(events)
            self._rows_gauge.labels(table="rollups").set(rollups)
        if counts["rolled"] or counts["deleted"] or dropped:
            log.info("history.retained", rolled=counts["rolled"], deleted=counts["deleted"], rollups_dropped=dropped,
                     events=events, rollups=rollups)
        done.callback(None)

    def _roll_up(self, batch: list[tuple[int, tuple]]) -> None:
        """Fold a batch of events (``(id, stats row)``) into the roll-ups, in one transaction."""
        groups = self.engine.groups
        catalog = self.engine.catalog
        sizes = {image_id: catalog.images[image_id].size for image_id in catalog}
        self.store.roll_up(roll_up((Row._make(row) for _, row in batch), self.period, sizes, groups), batch[-1][0])
        if self._rolled_counter is not None:
            self._rolled_counter.inc(len(batch))


def history_of(engine: Engine) -> History | None:
    """Return the History among the engine's observers (None when statistics are not set up)."""
    for observer in engine.observers:
        if isinstance(observer, History):
            return observer
    return None
