"""SQLite persistence of nodes, captures and the event history (WAL, versioned schema with upgrade steps).

The engine writes a node's new record, its history row and any capture change in one transaction *before*
it acts on them (the journal pattern). With ``synchronous=FULL`` (the default, ``database.synchronous`` in
cidd.yaml) every commit is on disk before the action leaves, so a restart resumes from exactly what had been
decided, even after a power loss of the head node. With ``normal`` a commit survives a crash of cidd
(``kill -9``) but the last ones may be lost with the power; the agents' hellos then re-establish each node.
Calls are synchronous, on the reactor thread; ``bench/store_sync.py`` measures what each setting costs
(docs/performance.md).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

from cidcommon.errors import CidError
from cidcommon.vocabulary import Mode
from cidd.core.captures import Capture, CaptureState, NodeResult, Result
from cidd.core.machine import Node, State, Transition
from cidd.core.stats import (
    ALL,
    PHASES,
    ROLLUP_COLUMNS,
    TIMED,
    TOTAL,
    Duration,
    Failure,
    Figures,
    Rollup,
    RollupKey,
    Tally,
)

SCHEMA_VERSION = 4

_UPGRADES: dict[int, str] = {
    1: """
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY, state TEXT NOT NULL, image TEXT, target TEXT, job TEXT,
        online INTEGER NOT NULL DEFAULT 0, mode TEXT, boot_id TEXT, reboot_from TEXT,
        attempt INTEGER NOT NULL DEFAULT 0, rung INTEGER NOT NULL DEFAULT 0,
        deadline REAL, since REAL NOT NULL DEFAULT 0, reason TEXT
    );
    CREATE TABLE captures (
        id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, image TEXT NOT NULL, user TEXT,
        requester TEXT NOT NULL, created REAL NOT NULL, deadline REAL NOT NULL, state TEXT NOT NULL,
        ended REAL
    );
    CREATE INDEX captures_job ON captures (job, id);
    CREATE INDEX captures_state ON captures (state);
    CREATE TABLE capture_nodes (
        capture_id INTEGER NOT NULL REFERENCES captures (id), node TEXT NOT NULL,
        position INTEGER NOT NULL, result TEXT NOT NULL, reason TEXT,
        PRIMARY KEY (capture_id, node)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, node TEXT NOT NULL, job TEXT, image TEXT,
        from_state TEXT NOT NULL, to_state TEXT NOT NULL, attempt INTEGER NOT NULL, rung INTEGER NOT NULL,
        elapsed REAL NOT NULL, detail TEXT NOT NULL
    );
    CREATE INDEX events_node ON events (node, id);
    CREATE INDEX events_job ON events (job, id);
    """,
    2: """
    CREATE TABLE boot_profiles (
        node TEXT PRIMARY KEY, boot TEXT NOT NULL, updated REAL NOT NULL, token TEXT, expires REAL
    );
    """,
    # Statistics (cidd/core/stats.py, cidd/history.py): retention folds every event, soon after it is written,
    # into roll-up rows, for its period and for the totals since the database began (period -1): per (node,
    # image), per node (image '*') and per (image, group) (node '*'); history_marks.rolled_upto is the last
    # event folded. Events go later (by age and count), periods later still. Failures get a partial index.
    3: """
    CREATE TABLE rollups (
        period REAL NOT NULL, node TEXT NOT NULL, image TEXT NOT NULL, grp TEXT NOT NULL,
        switches INTEGER NOT NULL, ok INTEGER NOT NULL, failed INTEGER NOT NULL, fallback_saves INTEGER NOT NULL,
        climbs INTEGER NOT NULL, bytes INTEGER NOT NULL, sized_install_s REAL NOT NULL, first_ts REAL,
        last_ts REAL, failure_ts REAL, failure_reason TEXT, counts TEXT NOT NULL, histograms BLOB NOT NULL,
        PRIMARY KEY (period, node, image, grp)
    );
    CREATE INDEX rollups_node ON rollups (node, period);
    CREATE TABLE history_marks (name TEXT PRIMARY KEY, value REAL NOT NULL);
    CREATE INDEX events_failed ON events (id) WHERE to_state = 'failed';
    """,
    # Cancelled captures (cidcapt --cancel): who cancelled; the state column says 'cancelled'.
    4: """
    ALTER TABLE captures ADD COLUMN cancelled_by TEXT;
    """,
}

_NODE_COLUMNS = [f.name for f in fields(Node)]


#: The durability settings cidd offers (SQLite's ``PRAGMA synchronous`` in WAL mode).
SYNCHRONOUS = ("full", "normal")


class StoreError(CidError):
    """The database cannot be opened or is newer than this cidd understands."""

    code = "store"


class Store:
    """The cidd database. One instance per process; not thread-safe (use it from the reactor thread)."""

    def __init__(self, path: Path | str, synchronous: str = "full") -> None:
        """Open (creating and upgrading) the database at ``path``; ``synchronous`` is ``full`` or ``normal``.

        Raises StoreError when it cannot be opened or is newer than this cidd.
        """
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._upgrade()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the database {self.path}: {exc}; move it away to start afresh, "
                             "or restore a backup") from None

    def _upgrade(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one upgrade step per version, each in its own transaction."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, newer than this cidd "
                             f"({SCHEMA_VERSION}); run a newer cidd or restore a backup")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            # executescript commits first, so the step carries its own transaction.
            self.db.executescript(f"BEGIN IMMEDIATE; {_UPGRADES[step]}; PRAGMA user_version={step}; COMMIT;")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        if self.db.in_transaction:
            yield self.db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    # --- nodes ---

    def save_node(self, node: Node) -> None:
        """Insert or replace ``node``'s row."""
        row = asdict(node)
        row["state"] = node.state.value
        row["online"] = int(node.online)
        columns = ", ".join(_NODE_COLUMNS)
        marks = ", ".join(f":{c}" for c in _NODE_COLUMNS)
        self.db.execute(f"INSERT OR REPLACE INTO nodes ({columns}) VALUES ({marks})", row)

    def load_nodes(self) -> dict[str, Node]:
        """Return every stored node by name."""
        cursor = self.db.execute(f"SELECT {', '.join(_NODE_COLUMNS)} FROM nodes")
        nodes = {}
        for row in cursor:
            data = dict(zip(_NODE_COLUMNS, row, strict=True))
            data["state"] = State(data["state"])
            data["online"] = bool(data["online"])
            data["mode"] = Mode(data["mode"]) if data["mode"] in tuple(Mode) else None
            nodes[data["name"]] = Node(**data)
        return nodes

    def add_event(self, ts: float, transition: Transition) -> None:
        """Append one history row."""
        t = transition
        self.db.execute(
            "INSERT INTO events (ts, node, job, image, from_state, to_state, attempt, rung, elapsed, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ts, t.node, t.job, t.image, t.from_state, t.to_state, t.attempt, t.rung, t.elapsed, t.detail),
        )

    def events(self, node: str | None = None, job: str | None = None, limit: int = 100_000) -> list[dict]:
        """Return history rows (oldest first), optionally for one node or one job."""
        query = "SELECT id, ts, node, job, image, from_state, to_state, attempt, rung, elapsed, detail FROM events"
        clauses, args = [], []
        if node is not None:
            clauses.append("node = ?")
            args.append(node)
        if job is not None:
            clauses.append("job = ?")
            args.append(job)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY id LIMIT ?"
        names = ["id", "ts", "node", "job", "image", "from", "to", "attempt", "rung", "elapsed", "detail"]
        return [dict(zip(names, row, strict=True)) for row in self.db.execute(query, (*args, limit))]

    # --- boot profiles ---

    def set_boot(self, node: str, boot: str, ts: float, token: str | None = None,
                 expires: float | None = None) -> None:
        """Record ``node``'s next boot (``installer`` or ``disk``) and its single-use boot token, if any."""
        self.db.execute("INSERT OR REPLACE INTO boot_profiles (node, boot, updated, token, expires)"
                        " VALUES (?, ?, ?, ?, ?)", (node, boot, ts, token, expires))

    def boot_profiles(self) -> dict[str, tuple[str, str | None, float | None]]:
        """Return {node: (next boot, boot token or None, token expiry)} for every published profile."""
        rows = self.db.execute("SELECT node, boot, token, expires FROM boot_profiles").fetchall()
        return {node: (boot, token, expires) for node, boot, token, expires in rows}

    def use_boot_token(self, node: str) -> None:
        """Forget ``node``'s boot token (it was used)."""
        self.db.execute("UPDATE boot_profiles SET token = NULL, expires = NULL WHERE node = ?", (node,))

    # --- captures ---

    def save_capture(self, capture: Capture) -> Capture:
        """Insert (when it has no id) or update ``capture`` and its node results; return it with its id."""
        cap = capture
        if cap.id is None:
            cursor = self.db.execute(
                "INSERT INTO captures (job, image, user, requester, created, deadline, state, ended, cancelled_by)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cap.job, cap.image, cap.user, cap.requester, cap.created, cap.deadline, cap.state.value,
                 cap.ended, cap.cancelled_by),
            )
            cap = Capture(**{**cap.__dict__, "id": cursor.lastrowid})
        else:
            self.db.execute("UPDATE captures SET state = ?, ended = ?, cancelled_by = ? WHERE id = ?",
                            (cap.state.value, cap.ended, cap.cancelled_by, cap.id))
        self.db.executemany(
            "INSERT OR REPLACE INTO capture_nodes (capture_id, node, position, result, reason)"
            " VALUES (?, ?, ?, ?, ?)",
            ((cap.id, name, pos, r.result.value, r.reason) for pos, (name, r) in enumerate(cap.nodes.items())),
        )
        return cap

    def save_node_results(self, capture: Capture, names: Iterable[str]) -> None:
        """Update the stored results of ``names`` within ``capture`` (which must have an id)."""
        self.db.executemany(
            "UPDATE capture_nodes SET result = ?, reason = ? WHERE capture_id = ? AND node = ?",
            ((capture.nodes[n].result.value, capture.nodes[n].reason, capture.id, n) for n in names),
        )

    def _capture_from_row(self, row: tuple) -> Capture:
        cid, job, image, user, requester, created, deadline, state, ended, cancelled_by = row
        results = {
            name: NodeResult(Result(result), reason)
            for name, result, reason in self.db.execute(
                "SELECT node, result, reason FROM capture_nodes WHERE capture_id = ? ORDER BY position", (cid,))
        }
        return Capture(job=job, image=image, nodes=results, user=user, requester=requester, created=created,
                       deadline=deadline, state=CaptureState(state), ended=ended, id=cid, cancelled_by=cancelled_by)

    _CAPTURE_SELECT = ("SELECT id, job, image, user, requester, created, deadline, state, ended, cancelled_by"
                       " FROM captures")

    def latest_capture(self, job: str) -> Capture | None:
        """Return the most recent capture of ``job``, or None."""
        row = self.db.execute(f"{self._CAPTURE_SELECT} WHERE job = ? ORDER BY id DESC LIMIT 1", (job,)).fetchone()
        return self._capture_from_row(row) if row else None

    def running_captures(self) -> list[Capture]:
        """Return every capture that has not ended, oldest first."""
        rows = self.db.execute(f"{self._CAPTURE_SELECT} WHERE state = ? ORDER BY id",
                               (CaptureState.RUNNING.value,)).fetchall()
        return [self._capture_from_row(row) for row in rows]

    def recent_captures(self, limit: int = 50) -> list[Capture]:
        """Return the ``limit`` most recent captures, newest first."""
        rows = self.db.execute(f"{self._CAPTURE_SELECT} ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [self._capture_from_row(row) for row in rows]

    # --- history: retention and roll-ups (cidd/history.py) ---

    def events_to_roll_up(self, limit: int) -> list[tuple[int, tuple]]:
        """Return up to ``limit`` events not rolled up yet, oldest first, as ``(id, stats row)``.

        A stats row has the columns of cidd.core.stats.Row (the detail only where it is a failure's reason).
        """
        rows = self.db.execute(f"SELECT id, {_STATS_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?",
                               (rolled_upto(self.db), limit)).fetchall()
        return [(row[0], tuple(row[1:])) for row in rows]

    def roll_up(self, rolled: Mapping[RollupKey, Figures], upto: int) -> None:
        """Add ``rolled`` (cidd.core.stats.roll_up: key (period, node, image, group) -> figures) to the roll-up
        rows and mark every event up to id ``upto`` as rolled up, in one transaction."""
        where = "period = ? AND node = ? AND image = ? AND grp = ?"
        select = f"SELECT {', '.join(ROLLUP_COLUMNS)} FROM rollups WHERE {where}"
        update = f"UPDATE rollups SET {', '.join(c + ' = ?' for c in ROLLUP_COLUMNS)} WHERE {where}"
        insert = (f"INSERT INTO rollups (period, node, image, grp, {', '.join(ROLLUP_COLUMNS)})"
                  f" VALUES ({', '.join('?' * (4 + len(ROLLUP_COLUMNS)))})")
        with self.transaction():
            for key, figures in rolled.items():
                found = self.db.execute(select, key).fetchone()
                if found is None:
                    self.db.execute(insert, (*key, *figures.to_row()))
                    continue
                merged = Figures.from_row(found)
                merged.merge(figures)
                self.db.execute(update, (*merged.to_row(), *key))
            self.db.execute("INSERT OR REPLACE INTO history_marks (name, value) VALUES ('rolled_upto', ?)", (upto,))

    def delete_events(self, before: float, keep: int, limit: int) -> int:
        """Delete up to ``limit`` of the oldest events that are rolled up and older than ``before`` (Unix time)
        or beyond the newest ``keep`` rows; return how many went.

        The table is in time order (bar clock steps): deleting stops at the first event that stays.
        """
        first, last = self.db.execute("SELECT MIN(id), MAX(id) FROM events").fetchone()
        if first is None:
            return 0
        young = self.db.execute("SELECT id FROM events WHERE ts >= ? ORDER BY id LIMIT 1", (before,)).fetchone()
        by_age = (young[0] - 1) if young is not None else last
        upto = min(max(by_age, last - keep), rolled_upto(self.db), first + limit - 1)
        if upto < first:
            return 0
        with self.transaction():
            return self.db.execute("DELETE FROM events WHERE id <= ?", (upto,)).rowcount

    def drop_rollups(self, before: float) -> int:
        """Delete the roll-ups of periods that started before ``before`` (never the totals); return how many went."""
        with self.transaction():
            return self.db.execute("DELETE FROM rollups WHERE period < ? AND period >= 0", (before,)).rowcount

    def recent_failures(self, limit: int = 20) -> list[dict]:
        """Return the ``limit`` latest events that put a node in ``failed``, newest first."""
        rows = self.db.execute("SELECT ts, node, job, image, detail FROM events WHERE to_state = 'failed'"
                               " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(zip(("ts", "node", "job", "image", "reason"), row, strict=True)) for row in rows]

    def switch_ends(self) -> list[tuple[str, str]]:
        """Return (node, "ready" | "failed") of every switch end still in the events table, oldest first."""
        return self.db.execute(f"SELECT node, to_state FROM events WHERE from_state IN {_PHASE_SET}"
                               " AND to_state IN ('ready', 'failed') ORDER BY id").fetchall()

    def history_size(self) -> tuple[int, int]:
        """Return (events kept, roll-up rows of periods): ids are never reused and only the oldest rows are
        deleted, so the ids of the kept events have no gaps."""
        first, last = self.db.execute("SELECT MIN(id), MAX(id) FROM events").fetchone()
        rollups = self.db.execute("SELECT COUNT(*) FROM rollups WHERE period >= 0").fetchone()[0]
        return (last - first + 1 if first is not None else 0), rollups


# --- statistics queries: plain functions of a connection, so that a reader thread can run them ---

_PHASE_SET = "(" + ", ".join(f"'{phase}'" for phase in PHASES) + ")"
#: The columns of cidd.core.stats.Row; the detail only where it is a failure's reason.
_STATS_COLUMNS = ("ts, node, job, image, from_state, to_state, rung, elapsed,"
                  " CASE WHEN to_state = 'failed' THEN detail END")
#: Rows that end a phase well, whose elapsed time the statistics keep (cidd.core.stats.timed).
_TIMED_SQL = " OR ".join(f"(from_state = '{phase}' AND to_state IN ({', '.join(repr(s) for s in sorted(tos))}))"
                         for phase, tos in TIMED.items())
#: Up to this many node names go into the SQL query; more are filtered after reading.
_MAX_SQL_NAMES = 500


def open_reader(path: Path | str) -> sqlite3.Connection:
    """Return a read-only connection to the database at ``path`` (for a thread of its own).

    Raises StoreError when it cannot be opened.
    """
    try:
        return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot open the database {path} for reading: {exc}") from None


def _node_clause(column: str, nodes: Sequence[str] | None, clauses: list[str], args: list) -> bool:
    """Add a clause selecting ``nodes`` when they are few; return whether the caller must filter the rows."""
    if nodes is None:
        return False
    if len(nodes) > _MAX_SQL_NAMES:
        return True
    clauses.append(f"{column} IN ({', '.join('?' * len(nodes))})")
    args.extend(nodes)
    return False


def _event_filter(since: float | None, until: float | None, nodes: Sequence[str] | None, image: str | None,
                  job: str | None, after: int | None) -> tuple[list[str], list, set[str] | None]:
    """Return the WHERE clauses, their arguments, and the node names to filter by after reading (or None)."""
    clauses, args = [f"from_state IN {_PHASE_SET}"], []
    for clause, value in (("ts >= ?", since), ("ts < ?", until), ("image = ?", image), ("job = ?", job),
                          ("id > ?", after)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    late = _node_clause("node", nodes, clauses, args)
    return clauses, args, set(nodes) if late and nodes is not None else None


class HistoryRows(NamedTuple):
    """What the statistics read from the events table (cidd.core.stats: Tally, Duration and Failure rows)."""

    tallies: list[Tally]
    durations: list[Duration]
    failures: list[Failure]


def history_rows(db: sqlite3.Connection, *, since: float | None = None, until: float | None = None,
                 nodes: Sequence[str] | None = None, image: str | None = None, job: str | None = None,
                 after: int | None = None) -> HistoryRows:
    """Return the events the statistics count (rows leaving a phase), counted by SQL where it can.

    ``since`` is inclusive, ``until`` exclusive (Unix times); ``nodes``, ``image`` and ``job`` select; ``after``
    keeps only events with a larger id (those not rolled up yet).
    """
    clauses, args, late = _event_filter(since, until, nodes, image, job, after)
    where = " AND ".join(clauses)
    tallies = db.execute("SELECT node, image, from_state, to_state, rung, COUNT(*), SUM(elapsed), MIN(ts), MAX(ts)"
                         f" FROM events WHERE {where} GROUP BY node, image, from_state, to_state, rung",
                         args).fetchall()
    durations = db.execute(f"SELECT node, image, from_state, elapsed FROM events WHERE {where} AND ({_TIMED_SQL})",
                           args).fetchall()
    failures = db.execute(f"SELECT ts, node, image, detail FROM events WHERE {where} AND to_state = 'failed'",
                          args).fetchall()
    if late is not None:
        tallies = [row for row in tallies if row[0] in late]
        durations = [row for row in durations if row[0] in late]
        failures = [row for row in failures if row[1] in late]
    return HistoryRows(list(map(Tally._make, tallies)), list(map(Duration._make, durations)),
                       list(map(Failure._make, failures)))


def _rollups(db: sqlite3.Connection, clauses: list[str], args: list, nodes: Sequence[str] | None) -> list[Rollup]:
    """Return the roll-up rows matching ``clauses`` (and ``nodes``, when given)."""
    late = _node_clause("node", nodes, clauses, args)
    rows = db.execute(f"SELECT period, node, image, grp, {', '.join(ROLLUP_COLUMNS)} FROM rollups"
                      f" WHERE {' AND '.join(clauses)}", args).fetchall()
    wanted = set(nodes) if late and nodes is not None else None
    return [Rollup(row[0], row[1], row[2], row[3], Figures.from_row(row[4:]))
            for row in rows if wanted is None or row[1] in wanted]


def rollup_rows(db: sqlite3.Connection, period: float, *, since: float | None = None, until: float | None = None,
                nodes: Sequence[str] | None = None, image: str | None = None) -> list[Rollup]:
    """Return the roll-ups of the periods (``period`` seconds long) that overlap [since, until) (a bound may be
    None): with no selection, the rows per node and per (image, group); with ``nodes`` or ``image``, the rows per
    node and image, selected."""
    if nodes is None and image is None:
        clauses, args = ["period >= 0", f"(node = '{ALL}' OR image = '{ALL}')"], []
    else:
        clauses, args = ["period >= 0", f"node != '{ALL}'", f"image != '{ALL}'"], []
    for clause, value in (("period > ?", None if since is None else since - period), ("period < ?", until),
                          ("image = ?", image)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    return _rollups(db, clauses, args, nodes)


def rollup_totals(db: sqlite3.Connection, *, nodes: Sequence[str] | None = None,
                  image: str | None = None) -> list[Rollup]:
    """Return the rolled-up totals since the database began.

    With no selection, the totals per node (image ALL) and per image and group (node ALL): what the whole
    history's statistics need, one row per node. With ``nodes`` or ``image``, the totals per node and image.
    """
    if nodes is None and image is None:
        return _rollups(db, [f"period = {TOTAL}", f"(node = '{ALL}' OR image = '{ALL}')"], [], None)
    clauses, args = [f"period = {TOTAL}", f"node != '{ALL}'", f"image != '{ALL}'"], []
    if image is not None:
        clauses.append("image = ?")
        args.append(image)
    return _rollups(db, clauses, args, nodes)


def rolled_upto(db: sqlite3.Connection) -> int:
    """Return the id of the last event folded into the roll-ups (0 when none)."""
    row = db.execute("SELECT value FROM history_marks WHERE name = 'rolled_upto'").fetchone()
    return int(row[0]) if row else 0


def oldest_event(db: sqlite3.Connection) -> float | None:
    """Return the time of the oldest event still kept (older history is in roll-ups), or None."""
    row = db.execute("SELECT ts FROM events ORDER BY id LIMIT 1").fetchone()
    return row[0] if row else None
