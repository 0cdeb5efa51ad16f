"""cidd as a service tree (cidd/service.py): ordered start and stop, a failed start undoes what started,
persist-then-act (no command leaves before its row is committed), and SIGTERM in the middle of a switch."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cidcatalog.catalog import Catalog, Image
from cidd.config import parse_config
from cidd.core.machine import State
from cidd.engine import Engine
from cidd.service import CHILDREN, OrderedService, Step, build_service
from cidd.store import Store
from tests.procs import Cluster, _env

A = "alma-9-1"


class Recorder(Service):
    """A child that records its start and stop in ``log``; ``stop_with`` is what its stop returns."""

    def __init__(self, name: str, log: list[str], fail: bool = False, stop_with: Any = None) -> None:
        self.setName(name)
        self.log, self.fail, self.stop_with = log, fail, stop_with

    def startService(self) -> None:  # noqa: N802
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"start {self.name}")
        Service.startService(self)

    def stopService(self) -> Any:  # noqa: N802
        Service.stopService(self)
        self.log.append(f"stop {self.name}")
        return self.stop_with


def test_children_start_in_order_and_stop_in_reverse_one_after_the_other() -> None:
    log: list[str] = []
    slow: Deferred[None] = Deferred()
    top = OrderedService()
    for name in ("a", "b", "c"):
        Recorder(name, log, stop_with=slow if name == "c" else None).setServiceParent(top)
    top.startService()
    assert log == ["start a", "start b", "start c"]
    fired: list[object] = []
    top.stopService().addCallback(fired.append)
    assert log[-1] == "stop c" and not fired  # b waits until c's stop has finished
    slow.callback(None)
    assert log[3:] == ["stop c", "stop b", "stop a"] and fired == [None]


def test_a_child_that_fails_to_start_stops_those_already_started_and_raises() -> None:
    log: list[str] = []
    top = OrderedService()
    for name, fail in (("a", False), ("b", False), ("c", True), ("d", False)):
        Recorder(name, log, fail=fail).setServiceParent(top)
    with pytest.raises(RuntimeError, match="c cannot start"):
        top.startService()
    assert log == ["start a", "start b", "stop b", "stop a"]


def test_a_step_that_never_started_is_not_stopped() -> None:
    stopped: list[str] = []
    step = Step("x", lambda: None, lambda: stopped.append("x"))
    step.stopService()
    assert stopped == []


def test_the_tree_has_the_named_children_in_order(tmp_path: Path) -> None:
    config = parse_config({"state_dir": str(tmp_path)}, "test.yaml")
    top, _ = build_service(config, Clock())
    assert tuple(child.name for child in top) == CHILDREN
    assert CHILDREN[:4] == ("lock", "store", "power", "engine")


def test_a_second_cidd_on_the_same_state_dir_is_refused_before_it_opens_the_database(tmp_path: Path) -> None:
    config = parse_config({"state_dir": str(tmp_path)}, "test.yaml")
    first, first_parts = build_service(config, Clock())
    first.getServiceNamed("lock").startService()
    second, parts = build_service(config, Clock())
    with pytest.raises(Exception, match="another cidd") as err:
        second.startService()
    assert "state_dir" in str(err.value)
    assert parts.store is None  # the database was never opened by the second one
    first.getServiceNamed("lock").stopService()


# --- persist, then act ----------------------------------------------------------------------------------------

class CommittedCheckingLink:
    """An AgentLink that, at every command, reads the node's row through a second SQLite connection: what it
    sees is only what was committed. A command sent before its step's row was committed is recorded."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.sent: list[tuple[str, str, str]] = []  # (node, command, committed state at that moment)

    def command(self, node: str, message: dict) -> Deferred:
        with sqlite3.connect(self.db_path) as db:
            row = db.execute("SELECT state FROM nodes WHERE name = ?", (node,)).fetchone()
        self.sent.append((node, message["type"], row[0] if row else "none"))
        return Deferred()


def test_no_command_leaves_before_its_row_is_committed(tmp_path: Path) -> None:
    config = parse_config({"state_dir": str(tmp_path), "nodes": [{"hosts": "n[1-3]"}]}, "test.yaml")
    catalog = Catalog({A: Image("alma", "9", "1", f"{A}.tar.zst", sha256="ab" * 32, size=10)})
    store = Store(tmp_path / "cidd.sqlite")
    link = CommittedCheckingLink(tmp_path / "cidd.sqlite")
    clock = Clock()
    clock.advance(1000)
    engine = Engine(config, catalog, store, clock, link)
    engine.start()
    for name in ("n1", "n2", "n3"):
        engine.agent_connected(name, f"b-{name}", "system", "debian-12-1")
    engine.capture("j1", ["n1", "n2", "n3"], A, "alice", "slurm", 600.0)
    for name in ("n1", "n2", "n3"):
        engine.agent_connected(name, f"i-{name}", "installer", None)
    assert {(node, kind) for node, kind, _ in link.sent} >= {(n, k) for n in ("n1", "n2", "n3")
                                                              for k in ("reboot", "install")}
    for node, kind, committed in link.sent:
        expected = {"reboot": State.TO_INSTALLER.value, "install": State.INSTALLING.value}[kind]
        assert committed == expected, f"{kind} to {node} left while the committed state was {committed!r}"
    engine.stop()
    store.close()


# --- SIGTERM in the middle of a switch (real processes) -------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_a_switch_stops_in_order_with_every_step_committed(tmp_path: Path) -> None:
    nodes = "node[01-30]"
    cluster = Cluster(tmp_path, heartbeat=2.0, groups={
        "default": {"ladder": [{"method": "reboot", "timeout": 60}], "install_timeout": 120}})
    cluster.start_cidd()
    try:
        cluster.start_fleet(nodes, "--reboot-delay", "0.3", "--install-time", "3", "--initial-image", "debian-12-1")
        cluster.wait_online(30)
        prolog = subprocess.Popen(
            [sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "-j", "900", "-n", nodes,
             "-i", "rocky-9-3", "--timeout", "300", "--connect-timeout", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cluster.state_dir))
        end = time.monotonic() + 60
        while time.monotonic() < end and '"to": "installing"' not in (cluster.root / "cidd.log").read_text():
            time.sleep(0.05)
        cluster.cidd.send_signal(signal.SIGTERM)
        assert cluster.cidd.wait(timeout=30) == 0
        events = [json.loads(line) for line in (cluster.root / "cidd.log").read_text().splitlines()
                  if line.startswith("{")]
        stopped = [e["service"] for e in events if e.get("event") == "cidd.service_stopped"]
        assert stopped == list(reversed(CHILDREN))
        logged = sum(e.get("event") == "node.transition" for e in events)
        with sqlite3.connect(cluster.db) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            rows = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        assert logged > 30 and rows == logged, "every transition cidd logged is a committed row, and no more"
        cluster.start_cidd()  # the capture goes on from what was committed
        out, err = prolog.communicate(timeout=180)
        assert prolog.returncode == 0, err[-3000:]
    finally:
        cluster.stop()


class FailingLink:
    """An AgentLink whose commands fail at once with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.sent: list[tuple[str, str]] = []

    def command(self, node: str, message: dict) -> Deferred:
        from twisted.internet.defer import fail

        self.sent.append((node, message["type"]))
        return fail(self.error)


def test_an_unanswered_install_is_not_a_refusal_but_a_refused_one_fails_the_node(tmp_path: Path) -> None:
    """Under load an agent may not answer within request_timeout: its session is dropped as half-open and its
    next hello says whether it holds the install. That must not fail the node; a real refusal does."""
    from cidd.engine import CommandTimeout
    from cidd.sessions import CommandError

    config = parse_config({"state_dir": str(tmp_path), "nodes": [{"hosts": "n1"}]}, "test.yaml")
    catalog = Catalog({A: Image("alma", "9", "1", f"{A}.tar.zst", sha256="ab" * 32, size=10)})
    outcomes = {}
    for error in (CommandTimeout("no answer to 'install' within the request timeout"),
                  CommandError("no space left on the target")):
        clock = Clock()
        clock.advance(1000)
        engine = Engine(config, catalog, Store(":memory:"), clock, FailingLink(error))
        engine.start()
        engine.agent_connected("n1", "b1", "system", "debian-12-1")
        engine.capture("j1", ["n1"], A, "alice", "slurm", 600.0)
        engine.agent_connected("n1", "i1", "installer", None)  # the install is sent and fails at once
        outcomes[type(error).__name__] = engine.nodes["n1"]
        engine.stop()
    assert outcomes["CommandTimeout"].state is State.INSTALLING and outcomes["CommandTimeout"].reason is None
    assert outcomes["CommandError"].state is State.FAILED and "no space" in outcomes["CommandError"].reason
