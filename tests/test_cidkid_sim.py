"""SimNode and SimFleet: fake reboots and installs under a fake clock, and a small fleet over real loopback TCP."""

from __future__ import annotations

import random
import resource
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from cidcommon.wire import LineBuffer, decode, encode
from cidinstall.marker import read_marker, write_install_marker
from cidsim import fleet as sim_module
from cidsim.agent_doubles import LoopTransport, MemoryEndpoint
from cidsim.fleet import FAILED_INSTALL_REASON, SharedHealth, SimConfig, SimFleet, SimNode, raise_nofile_limit

TOKEN = "sim-token"
INSTALL = {"type": "install", "id": "c-2", "image": "debian-12-2", "url": "http://head/i.tar.zst",
           "sha256": "ab" * 32, "size": 123, "format": "tar.zst"}


def boot_node(tmp_path: Path, clock: Clock, name: str = "node01", **config: Any
              ) -> tuple[SimNode, MemoryEndpoint, dict[str, Any], LoopTransport]:
    """Power a SimNode on and answer its hello; return the node, endpoint, hello and transport."""
    endpoint = MemoryEndpoint(clock)
    node = SimNode(name, tmp_path, clock, endpoint, TOKEN, config=SimConfig(**config), rng=random.Random(1))
    node.start()
    transport = endpoint.transports[-1]
    hello = greet(transport)
    assert node.announced
    return node, endpoint, hello, transport


def greet(transport: LoopTransport, heartbeat: float = 10.0) -> dict[str, Any]:
    [hello] = transport.lines()
    assert hello["type"] == "hello"
    transport.reply_to(hello, heartbeat=heartbeat, session="s")
    return hello


def test_hello_reports_marker_image_and_a_boot_id(tmp_path: Path) -> None:
    (tmp_path / "node01").mkdir(parents=True, exist_ok=True)
    write_install_marker(tmp_path / "node01", "debian-12-1")
    node, _endpoint, hello, _t = boot_node(tmp_path, Clock())
    assert (hello["node"], hello["mode"], hello["image"], hello["token"]) == ("node01", "system", "debian-12-1",
                                                                             TOKEN)
    assert hello["boot_id"] == node.boot_id and len(node.boot_id) == 36


def test_reboot_into_installer_comes_back_in_installer_mode_after_the_delay(tmp_path: Path) -> None:
    clock = Clock()
    node, endpoint, hello, transport = boot_node(tmp_path, clock, reboot_delay=5.0)
    transport.send({"type": "reboot", "id": "c-1", "boot": "installer", "method": "reboot"})
    assert transport.lines() == [{"type": "reply", "id": "c-1"}]
    clock.advance(0)  # the platform reboots after the reply
    assert transport.disconnecting  # graceful close: the reply is flushed first
    clock.advance(0)
    assert transport.closed and node.state == "rebooting" and not node.announced
    clock.advance(4.9)
    assert len(endpoint.transports) == 1
    clock.advance(0.1)
    assert len(endpoint.transports) == 2
    hello2 = greet(endpoint.transports[-1])
    assert hello2["mode"] == "installer" and hello2["image"] is None
    assert hello2["boot_id"] != hello["boot_id"] and node.boots == 2 and node.state == "up"


def test_reboot_delay_zero_comes_back_at_once(tmp_path: Path) -> None:
    clock = Clock()
    node, endpoint, _hello, transport = boot_node(tmp_path, clock, reboot_delay=0)
    transport.send({"type": "reboot", "id": 1, "boot": "disk"})
    clock.advance(0)
    clock.advance(0)
    assert len(endpoint.transports) == 2 and greet(endpoint.transports[-1])["mode"] == "system"


def into_installer(tmp_path: Path, clock: Clock, **config: Any) -> tuple[SimNode, MemoryEndpoint, LoopTransport]:
    node, endpoint, _hello, transport = boot_node(tmp_path, clock, reboot_delay=1.0, **config)
    transport.send({"type": "reboot", "id": 1, "boot": "installer"})
    transport.lines()
    clock.advance(0)
    clock.advance(0)
    clock.advance(1.0)
    transport = endpoint.transports[-1]
    assert greet(transport)["mode"] == "installer"
    return node, endpoint, transport


def test_install_reports_progress_writes_the_marker_and_reboots_into_the_image(tmp_path: Path) -> None:
    clock = Clock()
    node, endpoint, transport = into_installer(tmp_path, clock, install_time=10.0, install_steps=5)
    transport.send(INSTALL)
    events = transport.lines()
    assert events[0] == {"type": "reply", "id": "c-2"}
    for _ in range(5):
        clock.advance(2.0)
        events += transport.lines()
    progress = [e for e in events if e["type"] == "progress"]
    assert [p["done"] for p in progress] == [0, 20_000_000, 40_000_000, 60_000_000, 80_000_000, 100_000_000]
    assert all(p["total"] == 100_000_000 and p["image"] == "debian-12-2" for p in progress)
    assert events[-1] == {"type": "installed", "image": "debian-12-2", "ok": True}
    assert read_marker(node.marker) == "debian-12-2"
    assert node.marker == tmp_path / "node01" / "etc" / "cid-image"
    transport.send({"type": "reboot", "id": 9, "boot": "disk"})
    clock.advance(0)
    clock.advance(0)
    clock.advance(1.0)
    hello = greet(endpoint.transports[-1])
    assert (hello["mode"], hello["image"]) == ("system", "debian-12-2")


def test_install_time_zero_finishes_at_once(tmp_path: Path) -> None:
    clock = Clock()
    node, _endpoint, transport = into_installer(tmp_path, clock, install_time=0)
    transport.send(INSTALL)
    assert transport.lines()[-1] == {"type": "installed", "image": "debian-12-2", "ok": True}
    assert read_marker(node.marker) == "debian-12-2"


def test_injected_install_failure(tmp_path: Path) -> None:
    clock = Clock()
    node, _endpoint, transport = into_installer(tmp_path, clock, install_time=0,
                                                fail_install_nodes=frozenset({"node01"}))
    transport.send(INSTALL)
    assert transport.lines()[-1] == {"type": "installed", "image": "debian-12-2", "ok": False,
                                     "reason": FAILED_INSTALL_REASON, "retry": True}
    assert read_marker(node.marker) is None


def test_hung_reboot_never_comes_back_until_power_cycled(tmp_path: Path) -> None:
    clock = Clock()
    node, endpoint, _hello, transport = boot_node(tmp_path, clock, reboot_delay=1.0,
                                                  hang_reboot_nodes=frozenset({"node01"}))
    transport.send({"type": "reboot", "id": 1, "boot": "installer"})
    clock.advance(0)
    clock.pump([60.0] * 60)  # an hour
    assert node.state == "hung" and len(endpoint.transports) == 1 and transport.closed
    node.power_cycle("installer")
    assert greet(endpoint.transports[-1])["mode"] == "installer" and node.state == "up"


def test_hang_rate_is_seeded_and_reproducible(tmp_path: Path) -> None:
    def hung(seed: int) -> set[str]:
        clock = Clock()
        endpoint = MemoryEndpoint(clock)
        fleet = SimFleet([f"n{i:02d}" for i in range(40)], "h", 1, TOKEN, tmp_path, clock, endpoint=endpoint,
                         config=SimConfig(hang_reboot_rate=0.5, reboot_delay=0, seed=seed))
        fleet.startService()
        for transport in list(endpoint.transports):
            greet(transport)
            transport.send({"type": "reboot", "id": 1, "boot": "disk"})
        clock.advance(0)
        return {name for name, node in fleet.nodes.items() if node.state == "hung"}

    first, again, other = hung(3), hung(3), hung(4)
    assert first == again and first != other
    assert 5 < len(first) < 35


def test_shared_health_is_sampled_at_most_once_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_health(path: Path) -> dict[str, Any]:
        calls.append(path)
        return {"load1": 1.0, "mem_used_pct": 2.0, "disk_free": 3}

    monkeypatch.setattr(sim_module, "host_health", fake_health)
    clock = Clock()
    health = SharedHealth(clock, tmp_path)
    nodes = [SimNode(f"n{i}", tmp_path, clock, MemoryEndpoint(clock), TOKEN, health=health) for i in range(100)]
    clock.advance(100)
    for node in nodes:
        node.booted_at = 40.0
        assert node.health() == {"load1": 1.0, "mem_used_pct": 2.0, "disk_free": 3, "uptime": 60.0}
    assert len(calls) == 1
    clock.advance(1.0)
    nodes[0].health()
    assert len(calls) == 2


def test_nofile_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    now = raise_nofile_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
    assert now == hard or hard == resource.RLIM_INFINITY


def test_fleet_ramps_up_writes_initial_markers_and_stops(tmp_path: Path) -> None:
    clock = Clock()
    endpoint = MemoryEndpoint(clock)
    names = [f"sim{i:04d}" for i in range(450)]
    (tmp_path / "sim0007").mkdir(parents=True, exist_ok=True)
    write_install_marker(tmp_path / "sim0007", "rocky-9-1")
    fleet = SimFleet("sim[0000-0449]", "head", 38008, TOKEN, tmp_path, clock, endpoint=endpoint,
                     config=SimConfig(initial_image="debian-12-1"), ramp_batch=200, ramp_interval=0.1)
    assert list(fleet.nodes) == names
    all_in = fleet.when_announced()
    fleet.startService()
    assert len(endpoint.transports) == 200
    clock.advance(0.1)
    assert len(endpoint.transports) == 400
    clock.advance(0.1)
    assert len(endpoint.transports) == 450
    hellos = {h["node"]: h for h in (greet(t) for t in endpoint.transports)}
    assert sorted(hellos) == names and all_in.called and fleet.announced() == 450
    assert hellos["sim0007"]["image"] == "rocky-9-1" and hellos["sim0008"]["image"] == "debian-12-1"
    assert len({h["boot_id"] for h in hellos.values()}) == 450
    stopped = fleet.stopService()
    assert not stopped.called
    clock.advance(0)
    assert stopped.called and fleet.announced() == 0 and endpoint.open() == []


# -- real loopback ---------------------------------------------------------------------------------------------------

class TinyCidd(Protocol):
    """Just enough of cidd: answers hello and heartbeats, records what it heard, sends what a test asks."""

    def connectionMade(self) -> None:
        self.buffer = LineBuffer()
        self.node: str | None = None

    def dataReceived(self, data: bytes) -> None:
        for line in self.buffer.feed(data):
            message = decode(line)
            self.factory.heard.append(message)
            if message["type"] == "hello":
                self.node = message["node"]
                self.factory.sessions[self.node] = self
                reply = {"type": "reply", "id": message["id"], "proto": 1, "heartbeat": self.factory.heartbeat,
                         "session": "s"}
                if message.get("token") != TOKEN:
                    reply = {"type": "error", "id": message["id"], "code": "auth", "message": "wrong token"}
                self.transport.write(encode(reply))
            elif message["type"] == "heartbeat":
                self.factory.beats[self.node] = self.factory.beats.get(self.node, 0) + 1
                self.transport.write(encode({"type": "reply", "id": message["id"]}))
            for waiter in list(self.factory.waiters):
                waiter(message)

    def send(self, message: dict[str, Any]) -> None:
        self.transport.write(encode(message))

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.closed += 1
        for waiter in list(self.factory.waiters):
            waiter({"type": "closed", "node": self.node})


class TinyCiddFactory(Factory):
    protocol = TinyCidd

    def __init__(self, heartbeat: float = 0.2) -> None:
        self.heartbeat = heartbeat
        self.beats: dict[str | None, int] = {}
        self.closed = 0
        self.heard: list[dict[str, Any]] = []
        self.sessions: dict[str, TinyCidd] = {}
        self.waiters: list[Any] = []

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> defer.Deferred[dict[str, Any]]:
        """Return a Deferred firing with the first future message matching ``predicate`` (bounded in time)."""
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()

        def check(message: dict[str, Any]) -> None:
            if predicate(message) and not d.called:
                self.waiters.remove(check)
                d.callback(message)

        self.waiters.append(check)
        return d.addTimeout(timeout, reactor)


@pytest_twisted.ensureDeferred
async def test_fleet_over_real_loopback_says_hello_heartbeats_reboots_and_installs(tmp_path: Path) -> None:
    factory = TinyCiddFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    names = [f"node{i:02d}" for i in range(1, 6)]
    fleet = SimFleet(names, "127.0.0.1", port.getHost().port, TOKEN, tmp_path, reactor,
                     config=SimConfig(reboot_delay=0, install_time=0.3, initial_image="debian-12-1", seed=1))
    try:
        fleet.startService()
        await fleet.when_announced().addTimeout(10, reactor)
        hellos = [m for m in factory.heard if m["type"] == "hello"]
        assert sorted(h["node"] for h in hellos) == names
        assert all(h["mode"] == "system" and h["image"] == "debian-12-1" for h in hellos)
        beat = await factory.wait_for(lambda m: m["type"] == "heartbeat")
        assert {"load1", "mem_used_pct", "disk_free", "uptime"} <= set(beat)

        # cidd asks node03 to boot the installer: the old session goes, an installer session comes.
        old_boot = fleet.nodes["node03"].boot_id
        back = factory.wait_for(lambda m: m["type"] == "hello" and m["node"] == "node03")
        factory.sessions["node03"].send({"type": "reboot", "id": "r1", "boot": "installer", "method": "reboot"})
        hello = await back
        assert hello["mode"] == "installer" and hello["boot_id"] != old_boot

        installed = factory.wait_for(lambda m: m["type"] == "installed")
        factory.sessions["node03"].send({**INSTALL, "id": "i1"})
        assert (await installed) == {"type": "installed", "image": "debian-12-2", "ok": True}
        assert any(m["type"] == "progress" for m in factory.heard)

        back = factory.wait_for(lambda m: m["type"] == "hello" and m["node"] == "node03")
        factory.sessions["node03"].send({"type": "reboot", "id": "r2", "boot": "disk"})
        hello = await back
        assert (hello["mode"], hello["image"]) == ("system", "debian-12-2")
    finally:
        await fleet.stopService().addTimeout(10, reactor)
        await port.stopListening()
    assert fleet.announced() == 0


@pytest_twisted.ensureDeferred
async def test_fleet_with_a_wrong_token_is_refused_and_keeps_trying(tmp_path: Path) -> None:
    factory = TinyCiddFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    fleet = SimFleet(["bad01"], "127.0.0.1", port.getHost().port, "wrong", tmp_path, reactor)
    try:
        with capture_logs() as logs:
            refused = factory.wait_for(lambda m: m["type"] == "hello")
            closed = factory.wait_for(lambda m: m["type"] == "closed")
            fleet.startService()
            assert (await refused)["token"] == "wrong"
            await closed  # the agent hung up after the auth error
        assert fleet.announced() == 0
        service = fleet.nodes["bad01"].service
        assert service is not None and service.running
        [auth] = [e for e in logs if e["event"] == "agent.auth_failed"]
        assert auth["message"] == "wrong token" and auth["node"] == "bad01"
        [retry] = [e for e in logs if e["event"] == "agent.retry_after_auth_failure"]
        assert 30.0 <= retry["delay"] <= 90.0  # the longest delay, jittered
    finally:
        await fleet.stopService().addTimeout(10, reactor)
        await port.stopListening()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_two_thousand_nodes_in_one_process(tmp_path: Path) -> None:
    """2,000 sessions (plus their 2,000 server ends in this same process) start, beat and stay up."""
    factory = TinyCiddFactory(heartbeat=2.0)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
    names = [f"sim{i:04d}" for i in range(1, 2001)]
    fleet = SimFleet(names, "127.0.0.1", port.getHost().port, TOKEN, tmp_path, reactor,
                     config=SimConfig(initial_image="debian-12-1", seed=2))
    try:
        with capture_logs() as logs:
            all_beat = factory.wait_for(lambda m: len(factory.beats) == 2000, timeout=60)
            fleet.startService()
            await fleet.when_announced().addTimeout(60, reactor)
            await all_beat  # every node's heartbeat came and was answered
            twice = factory.wait_for(lambda m: min(factory.beats.values()) >= 2, timeout=30)
            await twice
        assert sorted(factory.sessions) == names and factory.closed == 0
        assert fleet.announced() == 2000
        assert sum(e["event"] == "agent.connected" for e in logs) == 2000
        assert not [e for e in logs if e["log_level"] in ("warning", "error")]
    finally:
        await fleet.stopService().addTimeout(60, reactor)
        await port.stopListening()


def test_power_off_during_a_reboot_cancels_the_boot_quietly(tmp_path: Path) -> None:
    clock = Clock()
    node, endpoint, _hello, transport = boot_node(tmp_path, clock, reboot_delay=30.0)
    transport.send({"type": "reboot", "id": 1, "boot": "installer"})
    clock.advance(0)
    clock.advance(0)
    with capture_logs() as logs:
        stopped = node.stop()
        assert stopped.called
        clock.pump([10.0] * 10)
    assert node.state == "off" and len(endpoint.transports) == 1
    assert not [e for e in logs if e["log_level"] == "error"]
    node.start()
    assert greet(endpoint.transports[-1])["mode"] == "system"


def test_reboot_during_an_install_reports_the_interrupted_install(tmp_path: Path) -> None:
    clock = Clock()
    node, endpoint, transport = into_installer(tmp_path, clock, install_time=100.0)
    transport.send(INSTALL)
    transport.lines()
    clock.advance(20)
    transport.send({"type": "reboot", "id": 5, "boot": "installer"})
    clock.advance(0)
    events = transport.lines()
    assert {"type": "installed", "image": "debian-12-2", "ok": False,
            "reason": "the node rebooted during the install", "retry": True} in events
    clock.pump([10.0] * 20)
    assert read_marker(node.marker) is None  # the interrupted install never wrote the marker
