"""Tests for cidd.store: schema version, WAL, round trips of nodes, captures and events, transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cidd.core.captures import Capture, CaptureState, NodeResult, Result
from cidd.core.machine import Node, State, Transition
from cidd.store import SCHEMA_VERSION, Store, StoreError

A, B = "alma-9-1", "debian-12-1"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cidd.sqlite"  # the parent does not exist yet


@pytest.fixture
def store(db_path: Path):
    s = Store(db_path)
    yield s
    s.close()


def switching_node(name: str = "n1") -> Node:
    return Node(name, state=State.TO_INSTALLER, image=A, target=B, job="j1", online=True, mode="system",
                boot_id="b1", reboot_from="b1", attempt=1, rung=2, deadline=1234.5, since=1000.25, reason=None)


def capture(job: str = "j1", names=("n3", "n1", "n2")) -> Capture:
    results = {name: NodeResult() for name in names}
    results["n1"] = NodeResult(Result.FAILED, "install failed")
    return Capture(job=job, image=B, nodes=results, user="alice", requester="slurm", created=100.0, deadline=700.0)


def transition(node: str = "n1", job: str | None = "j1", to: str = "to_installer") -> Transition:
    return Transition(node=node, job=job, image=B, from_state="ready", to_state=to, attempt=0, rung=1,
                      elapsed=12.5, detail="switch")


def test_new_database_gets_the_schema_version_and_its_tables(store, db_path):
    assert db_path.exists()
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"nodes", "captures", "capture_nodes", "events", "boot_profiles"} <= tables


def test_a_version_1_database_is_upgraded_in_place_keeping_its_rows(tmp_path):
    from cidd.store import _UPGRADES

    path = tmp_path / "v1.sqlite"
    old = sqlite3.connect(path)
    old.executescript(_UPGRADES[1] + "; PRAGMA user_version=1;")
    old.execute("INSERT INTO nodes (name, state, image) VALUES ('n7', 'ready', 'debian-12-1')")
    old.commit()
    old.close()
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.load_nodes()["n7"].image == "debian-12-1"
    store.set_boot("n7", "installer", 5.0, "tok", 65.0)
    assert store.boot_profiles() == {"n7": ("installer", "tok", 65.0)}
    store.use_boot_token("n7")
    assert store.boot_profiles() == {"n7": ("installer", None, None)}


def test_wal_mode_is_on(store, db_path):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = sqlite3.connect(db_path)  # WAL is a property of the file, seen by other connections too
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_nodes_round_trip(store):
    nodes = [switching_node("n1"), Node("n2"), Node("n3", state=State.FAILED, target=B, reason="it broke",
                                                    online=False, since=5.0)]
    for node in nodes:
        store.save_node(node)
    loaded = store.load_nodes()
    assert loaded == {n.name: n for n in nodes}
    assert loaded["n1"].state is State.TO_INSTALLER and loaded["n1"].online is True


def test_saving_a_node_again_replaces_its_row(store):
    store.save_node(switching_node())
    store.save_node(Node("n1", state=State.READY, image=B, online=True, mode="system"))
    assert store.load_nodes() == {"n1": Node("n1", state=State.READY, image=B, online=True, mode="system")}


def test_events_round_trip_and_filter(store):
    store.add_event(10.0, transition("n1", "j1"))
    store.add_event(11.0, transition("n2", "j1", to="installing"))
    store.add_event(12.0, transition("n1", None, to="offline"))
    rows = store.events()
    assert [(r["ts"], r["node"], r["to"]) for r in rows] == [(10.0, "n1", "to_installer"), (11.0, "n2", "installing"),
                                                           (12.0, "n1", "offline")]
    first = rows[0]
    assert {k: first[k] for k in ("job", "image", "from", "attempt", "rung", "elapsed", "detail")} == {
        "job": "j1", "image": B, "from": "ready", "attempt": 0, "rung": 1, "elapsed": 12.5, "detail": "switch"}
    assert [r["ts"] for r in store.events(node="n1")] == [10.0, 12.0]
    assert [r["ts"] for r in store.events(job="j1")] == [10.0, 11.0]
    assert [r["ts"] for r in store.events(node="n1", job="j1")] == [10.0]
    assert [r["ts"] for r in store.events(limit=2)] == [10.0, 11.0]


def test_captures_round_trip_keeping_node_order(store):
    saved = store.save_capture(capture())
    assert saved.id is not None
    loaded = store.latest_capture("j1")
    assert loaded == saved
    assert list(loaded.nodes) == ["n3", "n1", "n2"]
    assert loaded.nodes["n1"] == NodeResult(Result.FAILED, "install failed")
    assert store.latest_capture("nope") is None


def test_capture_updates_and_queries(store):
    first = store.save_capture(capture("j1"))
    second = store.save_capture(capture("j2"))
    assert [c.job for c in store.running_captures()] == ["j1", "j2"]

    results = dict(first.nodes)
    results["n3"] = NodeResult(Result.READY)
    updated = Capture(**{**first.__dict__, "nodes": results})
    store.save_node_results(updated, ["n3"])
    assert store.latest_capture("j1").nodes["n3"] == NodeResult(Result.READY)

    ended = Capture(**{**updated.__dict__, "state": CaptureState.FAILED, "ended": 300.0})
    assert store.save_capture(ended).id == first.id  # an update, not a new row
    assert [c.job for c in store.running_captures()] == ["j2"]
    assert store.latest_capture("j1") == ended
    assert [c.id for c in store.recent_captures()] == [second.id, first.id]
    assert [c.id for c in store.recent_captures(limit=1)] == [second.id]


def test_a_cancelled_capture_keeps_its_state_who_cancelled_it_and_its_reasons_when_reopened(db_path):
    s = Store(db_path)
    saved = s.save_capture(capture())
    results = {**saved.nodes, "n3": NodeResult(Result.PENDING, "cancelled by bob: the node was not rebooted yet")}
    s.save_capture(Capture(**{**saved.__dict__, "nodes": results, "state": CaptureState.CANCELLED, "ended": 150.0,
                              "cancelled_by": "bob"}))
    s.close()
    again = Store(db_path)
    try:
        loaded = again.latest_capture("j1")
        assert (loaded.state, loaded.ended, loaded.cancelled_by) == (CaptureState.CANCELLED, 150.0, "bob")
        assert loaded.nodes["n3"].reason == "cancelled by bob: the node was not rebooted yet"
        assert again.running_captures() == []
    finally:
        again.close()


def test_a_version_3_database_gets_the_cancelled_by_column_keeping_its_captures(tmp_path):
    from cidd.store import _UPGRADES

    path = tmp_path / "v3.sqlite"
    old = sqlite3.connect(path)
    old.executescript(";".join(_UPGRADES[v] for v in (1, 2, 3)) + "; PRAGMA user_version=3;")
    old.execute("INSERT INTO captures (job, image, user, requester, created, deadline, state)"
                " VALUES ('j9', 'debian-12-1', 'alice', 'scheduler', 1.0, 2.0, 'running')")
    old.commit()
    old.close()
    store = Store(path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        loaded = store.latest_capture("j9")
        assert (loaded.state, loaded.cancelled_by) == (CaptureState.RUNNING, None)
    finally:
        store.close()


def test_latest_capture_is_the_newest_of_the_job(store):
    old = store.save_capture(Capture(**{**capture().__dict__, "state": CaptureState.OK, "ended": 200.0}))
    new = store.save_capture(capture())
    assert new.id > old.id
    assert store.latest_capture("j1") == new


def test_transaction_rolls_back_on_exception(store):
    store.save_node(Node("n0"))
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.save_node(switching_node("n1"))
            store.add_event(1.0, transition())
            store.save_capture(capture())
            raise RuntimeError("boom")
    assert set(store.load_nodes()) == {"n0"}
    assert store.events() == []
    assert store.latest_capture("j1") is None
    assert not store.db.in_transaction


def test_transaction_commits_and_nested_blocks_join_the_outer_one(store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.save_node(Node("n1"))
            with store.transaction():  # joins: its end does not commit
                store.save_node(Node("n2"))
            raise RuntimeError("boom")
    assert store.load_nodes() == {}
    with store.transaction():
        store.save_node(Node("n1"))
    assert set(store.load_nodes()) == {"n1"}


def test_reopening_the_file_keeps_the_data(db_path):
    s = Store(db_path)
    with s.transaction():
        s.save_node(switching_node())
        s.add_event(5.0, transition())
        saved = s.save_capture(capture())
    s.close()
    again = Store(db_path)
    try:
        assert again.load_nodes() == {"n1": switching_node()}
        assert [e["ts"] for e in again.events()] == [5.0]
        assert again.latest_capture("j1") == saved
        assert again.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        again.close()


def test_a_newer_schema_is_refused(db_path):
    Store(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError) as err:
        Store(db_path)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(err.value)
    assert str(db_path) in str(err.value)


def test_in_memory_store_works():
    s = Store(":memory:")
    try:
        s.save_node(Node("n1"))
        assert set(s.load_nodes()) == {"n1"}
    finally:
        s.close()


def test_a_file_that_is_not_a_database_raises_store_error(db_path):
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not an sqlite database, just some text\n" * 100)
    with pytest.raises(StoreError) as err:
        Store(db_path)
    assert f"cannot open the database {db_path}" in str(err.value)
    assert "file is not a database" in str(err.value)
