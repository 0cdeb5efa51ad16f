"""Reboot windows: cidd.core.windows.Window, and the engine driven by a Clock (100 nodes, a window of 10).

The engine runs with an in-memory store and a link that records the commands; agents "come back" when the
test says so. Deadlines must count from the moment a reboot is really issued, not from the capture's start.
"""

from __future__ import annotations

import random

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cidcatalog.catalog import Catalog, Image
from cidd.bmc import BmcTarget
from cidd.config import parse_config
from cidd.core.machine import State
from cidd.core.windows import Window
from cidd.engine import Engine
from cidd.power import BmcCredentials
from cidd.status_http import EngineCollector
from cidd.store import Store
from tests.fakes import SilentLink

IMAGE = "alma-9-1"


def test_window_bounds_holders_and_starts_the_oldest_waiting_request() -> None:
    window, started = Window("reboots", 2), []
    for key in "abcd":
        window.request(key, lambda k=key: started.append(k))
    assert started == ["a", "b"] and (window.in_flight, window.waiting) == (2, 2)
    assert window.request("a", lambda: started.append("a again"))  # a holder's request runs at once
    window.release("c")  # a queued request is dropped
    window.release("a")
    assert started == ["a", "b", "a again", "d"] and window.holds("d") and not window.queued("c")
    window.release("zzz")  # unknown keys are ignored
    assert (window.in_flight, window.waiting, window.peak) == (2, 0, 2)
    unbounded = Window("power", None)
    for key in range(50):
        assert unbounded.request(key, lambda: None)
    with pytest.raises(ValueError):
        Window("bad", 0)


def make_engine(tmp_path, count: int, windows: dict, timeout: float = 100.0) -> tuple[Engine, Clock, SilentLink]:
    config = parse_config({"state_dir": str(tmp_path), "nodes": [{"hosts": f"n[001-{count:03d}]"}],
                           "windows": windows, "capture_timeout": 100000,
                           "groups": {"default": {"ladder": [{"method": "reboot", "timeout": timeout},
                                                             {"method": "reboot", "timeout": timeout}]}}},
                          "test.yaml")
    catalog = Catalog({IMAGE: Image("alma", "9", "1", "alma-9-1.tar.zst")})
    clock, link = Clock(), SilentLink()
    clock.advance(1000)
    engine = Engine(config, catalog, Store(":memory:"), clock, link)
    engine.start()
    for name in engine.nodes:
        engine.agent_connected(name, f"{name}-boot0", "system", "debian-12-1")
    return engine, clock, link


def names(count: int) -> list[str]:
    return [f"n{i:03d}" for i in range(1, count + 1)]


def come_back_in_installer(engine: Engine, name: str) -> None:
    engine.agent_lost(name)
    engine.agent_connected(name, f"{name}-boot1", "installer", None)


def test_a_hundred_nodes_never_more_than_ten_reboots_in_flight(tmp_path) -> None:
    engine, clock, link = make_engine(tmp_path, 100, {"reboots": 10})
    engine.capture("j1", names(100), IMAGE, "alice", "slurm", None)
    rng = random.Random(7)
    back: set[str] = set()
    peak = 0

    def in_flight() -> int:
        return len(set(link.reboots()) - back)

    def schedule(start: int) -> None:
        for name in link.reboots()[start:]:  # each issued reboot takes 1 to 30 s
            clock.callLater(rng.uniform(1, 30), finish, name)

    def finish(name: str) -> None:
        back.add(name)
        before = len(link.reboots())
        come_back_in_installer(engine, name)
        schedule(before)

    schedule(0)
    for _ in range(2000):
        peak = max(peak, in_flight())
        assert in_flight() <= 10
        clock.advance(0.5)
        if len(back) == 100:
            break
    assert len(back) == 100 and peak == 10
    assert {engine.nodes[n].state for n in names(100)} == {State.INSTALLING}
    assert engine.reboot_window.peak == 10 and len(link.reboots()) == 100  # each node rebooted once


def test_deadlines_count_from_the_issue_and_grow_with_the_nodes_in_flight(tmp_path) -> None:
    engine, clock, link = make_engine(tmp_path, 20, {"reboots": 10, "timeout_per_node": 2}, timeout=100.0)
    engine.capture("j1", names(20), IMAGE, "alice", "slurm", None)
    first, second = names(20)[:10], names(20)[10:]
    assert link.reboots() == first
    # issued at 1000 with 1..10 nodes in flight: 100 s + 2 s per node
    assert [engine.nodes[n].deadline for n in first] == [1000 + 100 + 2 * k for k in range(1, 11)]
    assert all(engine.nodes[n].deadline is None for n in second)  # queued: no deadline yet
    assert engine.node_status(second[0])["state"] == "to_installer"
    assert (engine.node_status(first[0])["reboot"], engine.node_status(second[0])["reboot"]) == ("issued", "queued")
    clock.advance(80)
    for name in first:
        come_back_in_installer(engine, name)
    assert link.reboots() == first + second  # issued at 1080, each as a slot freed: 10 in flight each time
    assert [engine.nodes[n].deadline for n in second] == [1080 + 100 + 2 * 10] * 10
    clock.advance(110)  # 1190: long past "capture start + timeout", not yet "issue + timeout"
    assert {(engine.nodes[n].state, engine.nodes[n].rung) for n in second} == {(State.TO_INSTALLER, 0)}
    clock.advance(10)
    assert {engine.nodes[n].rung for n in second} == {1}  # climbed at the deadline counted from the issue


def test_a_node_leaving_its_step_frees_its_slot(tmp_path) -> None:
    engine, clock, link = make_engine(tmp_path, 3, {"reboots": 1}, timeout=50.0)
    engine.capture("j1", names(3), IMAGE, "alice", "slurm", None)
    assert link.reboots() == ["n001"]
    clock.advance(50)  # n001 times out: it climbs to rung 1 and queues again behind n002 and n003
    assert engine.nodes["n001"].rung == 1
    assert link.reboots() == ["n001", "n002"]
    come_back_in_installer(engine, "n002")
    assert link.reboots() == ["n001", "n002", "n003"]
    come_back_in_installer(engine, "n003")
    assert link.reboots() == ["n001", "n002", "n003", "n001"]
    assert engine.nodes["n001"].deadline == clock.seconds() + 50


def test_queued_reboots_survive_a_restart(tmp_path) -> None:
    engine, clock, link = make_engine(tmp_path, 4, {"reboots": 2})
    engine.capture("j1", names(4), IMAGE, "alice", "slurm", None)
    assert link.reboots() == ["n001", "n002"]
    assert engine.nodes["n004"].deadline is None
    restarted = Engine(engine.config, engine.catalog, engine.store, clock, SilentLink())
    restarted.start()
    assert restarted.reboot_window.in_flight == 2  # n001 and n002 hold their slots again
    assert restarted.nodes["n004"].deadline == clock.seconds() + 100  # agent rung: resent when it connects


def test_a_queued_node_that_went_offline_gets_its_reboot_when_its_agent_is_back(tmp_path) -> None:
    engine, clock, link = make_engine(tmp_path, 2, {"reboots": 1})
    engine.capture("j1", names(2), IMAGE, "alice", "slurm", None)
    engine.agent_lost("n002")  # queued behind n001, then its session drops (same boot)
    clock.advance(10)
    come_back_in_installer(engine, "n001")
    assert link.reboots() == ["n001"]  # nothing sent into a missing session
    assert engine.nodes["n002"].deadline == clock.seconds() + 100  # its slot and deadline start now
    engine.agent_connected("n002", "n002-boot0", "system", "debian-12-1")
    assert link.reboots() == ["n001", "n002"]
    assert engine.nodes["n002"].deadline == 1010 + 100  # the resend keeps the deadline


class Bmcs:
    """A PowerController stand-in: every BMC call waits until the test fires it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Deferred]] = []

    def _call(self, action: str, node: str) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((action, node, d))
        return d

    def target(self, node: str) -> BmcTarget:
        return BmcTarget(node=node, protocol="ipmi", address=f"10.1.0.{node[-1]}", host=f"10.1.0.{node[-1]}",
                         port=623, credentials=BmcCredentials.parse("u:p"))

    def set_next_boot(self, node: str, address: object, device: str) -> Deferred:
        return self._call("next_boot", node)

    def cycle(self, node: str, address: object) -> Deferred:
        return self._call("cycle", node)

    def pending(self) -> list[tuple[str, str, Deferred]]:
        return [c for c in self.calls if not c[2].called]


def test_power_window_bounds_bmc_actions_and_starts_the_deadline_with_the_call(tmp_path) -> None:
    config = parse_config({"state_dir": str(tmp_path), "nodes": [{"hosts": "n[001-006]"}],
                           "windows": {"power": 2}, "capture_timeout": 100000,
                           "bmc": {"address": "10.1.0.{index}", "credentials": str(tmp_path / "cred")},
                           "groups": {"default": {"ladder": [{"method": "power_cycle", "timeout": 60}]}}},
                          "test.yaml")
    clock, bmcs = Clock(), Bmcs()
    clock.advance(1000)
    engine = Engine(config, Catalog({IMAGE: Image("alma", "9", "1", "alma-9-1.tar.zst")}), Store(":memory:"),
                    clock, SilentLink(), bmcs)  # type: ignore[arg-type]
    engine.start()
    engine.capture("j1", names(6), IMAGE, "alice", "slurm", None)
    assert [node for _, node, _ in bmcs.pending()] == ["n001", "n002"]  # two power actions at once
    assert [engine.nodes[n].deadline for n in names(6)] == [1060, 1060, None, None, None, None]
    clock.advance(5)
    while bmcs.pending():
        assert len(bmcs.pending()) <= 2
        action, node, d = bmcs.pending()[0]
        d.callback(None)  # next_boot, then cycle: the slot is freed after the cycle
        clock.advance(1)
    cycled = [node for action, node, _ in bmcs.calls if action == "cycle"]
    assert cycled == names(6)
    # n003 got its slot at 1007, when n001's cycle ended (1005: n001 next boot, 1006: n002, 1007: n001 cycle)
    assert engine.nodes["n003"].deadline == 1007 + 60
    assert engine.power_window.peak == 2


def window_gauges(engine: Engine) -> dict[tuple[str, str], float]:
    """Return {(metric, window): value} of the cid_window_* gauges the metrics endpoint would show."""
    return {(family.name, sample.labels["window"]): sample.value
            for family in EngineCollector(engine).collect() if family.name.startswith("cid_window_")
            for sample in family.samples}


def test_window_gauges_show_holders_waiting_and_limits(tmp_path) -> None:
    engine, _clock, link = make_engine(tmp_path, 30, {"reboots": 10})
    assert window_gauges(engine) == {("cid_window_holders", "reboots"): 0, ("cid_window_holders", "power"): 0,
                                     ("cid_window_waiting", "reboots"): 0, ("cid_window_waiting", "power"): 0,
                                     ("cid_window_limit", "reboots"): 10}  # power is unbounded: no limit
    engine.capture("j1", names(30), IMAGE, "alice", "slurm", None)
    gauges = window_gauges(engine)
    assert gauges[("cid_window_holders", "reboots")] == 10 and gauges[("cid_window_waiting", "reboots")] == 20
    for name in link.reboots():
        come_back_in_installer(engine, name)
    gauges = window_gauges(engine)
    assert gauges[("cid_window_holders", "reboots")] == 10 and gauges[("cid_window_waiting", "reboots")] == 10
    assert len(link.reboots()) == 20
