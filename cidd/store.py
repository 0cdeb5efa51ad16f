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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

from cidcommon.errors import CidError
from cidcommon.vocabulary import Mode
from cidd.core.captures import Capture, CaptureState, NodeResult, Result
from cidd.core.machine import Node, State, Transition

SCHEMA_VERSION = 2

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
                "INSERT INTO captures (job, image, user, requester, created, deadline, state, ended)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (cap.job, cap.image, cap.user, cap.requester, cap.created, cap.deadline, cap.state.value,
                 cap.ended),
            )
            cap = Capture(**{**cap.__dict__, "id": cursor.lastrowid})
        else:
            self.db.execute("UPDATE captures SET state = ?, ended = ? WHERE id = ?",
                            (cap.state.value, cap.ended, cap.id))
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
        cid, job, image, user, requester, created, deadline, state, ended = row
        results = {
            name: NodeResult(Result(result), reason)
            for name, result, reason in self.db.execute(
                "SELECT node, result, reason FROM capture_nodes WHERE capture_id = ? ORDER BY position", (cid,))
        }
        return Capture(job=job, image=image, nodes=results, user=user, requester=requester, created=created,
                       deadline=deadline, state=CaptureState(state), ended=ended, id=cid)

    _CAPTURE_SELECT = "SELECT id, job, image, user, requester, created, deadline, state, ended FROM captures"

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
