"""Heartbeat intervals that grow with the number of agents, silence limits, and timeouts under load
(cidd/core/heartbeats.py, cidd/sessions.py, cidcommon/twisted_requests.py), driven with a Clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from cidcatalog.catalog import load_catalog
from cidcommon.twisted_requests import DeferredRequests
from cidd.config import parse_config
from cidd.core.heartbeats import HEARTBEAT_MAX, heartbeat_interval, silence_limit, worth_retelling
from cidd.engine import Engine
from cidd.sessions import HANDSHAKE_TIMEOUT, HELLO_TIMEOUT, CiddFactory, Sessions
from cidd.store import Store
from tests.fakes import TOKENS, Peer, agent_hello, client

REPO = Path(__file__).resolve().parent.parent


def make_world(tmp_path: Path, *, rate: float = 1.0, tls: bool = False) -> tuple[Clock, Engine, CiddFactory]:
    """Return a clock, an engine and a session factory: base heartbeat 5 s, ``rate`` heartbeats/s wanted."""
    clock = Clock()
    clock.advance(1000)
    config = parse_config({"state_dir": str(tmp_path), "heartbeat": 5, "heartbeat_rate": rate,
                           "groups": {"default": {"ladder": [{"method": "reboot", "timeout": 50}]}}})
    sessions = Sessions()
    engine = Engine(config, load_catalog(REPO / "images.yaml"), Store(":memory:"), clock, sessions)
    engine.start()
    return clock, engine, CiddFactory(engine, sessions, TOKENS, clock, tls=tls)


def agents(factory: CiddFactory, first: int, last: int) -> dict[int, Peer]:
    """Connect agents n<first>..n<last>; return their peers by number (hello answers read)."""
    peers = {}
    for number in range(first, last + 1):
        peer = Peer(factory)
        peer.send(agent_hello(node=f"n{number}"))
        peers[number] = peer
    return peers


@pytest.mark.parametrize("sessions, base, rate, expected", [
    (0, 10.0, 250.0, 10.0), (2500, 10.0, 250.0, 10.0), (4500, 10.0, 250.0, 18.0), (10_000, 10.0, 250.0, 40.0),
    (100_000, 10.0, 250.0, HEARTBEAT_MAX), (100_000, 10.0, 0.0, 10.0), (100_000, 45.0, 250.0, 45.0),
])
def test_the_interval_grows_with_the_sessions_up_to_its_bound(sessions, base, rate, expected):
    assert heartbeat_interval(sessions, base, rate) == expected


def test_the_silence_limit_is_three_intervals_but_at_most_55s_unless_configured_longer():
    assert silence_limit(10.0, 10.0) == 30.0
    assert silence_limit(15.0, 10.0) == 45.0
    assert silence_limit(40.0, 10.0) == 55.0
    assert silence_limit(30.0, 30.0) == 90.0  # an administrator's own long heartbeat keeps the old rule
    assert worth_retelling(10.0, 11.0) and not worth_retelling(10.0, 10.9)


def test_each_agent_is_told_the_interval_at_hello_and_again_when_it_moved(tmp_path):
    _clock, _engine, factory = make_world(tmp_path)
    peers = agents(factory, 1, 3)
    assert [p.received()[0]["heartbeat"] for p in peers.values()] == [5.0] * 3  # base: few agents
    peers |= agents(factory, 4, 12)
    assert peers[12].received()[0]["heartbeat"] == 12.0  # 12 agents at 1 heartbeat/s wanted
    peers[1].send({"type": "heartbeat", "id": 2, "load1": 0.1})
    assert peers[1].received() == [{"type": "reply", "id": 2, "heartbeat": 12.0}]
    peers[1].send({"type": "heartbeat", "id": 3, "load1": 0.1})
    assert peers[1].received() == [{"type": "reply", "id": 3}]  # told already: a plain answer
    peers |= agents(factory, 13, 45)
    assert peers[45].received()[0]["heartbeat"] == HEARTBEAT_MAX
    peers[12].send({"type": "heartbeat", "id": 2})
    assert peers[12].received() == [{"type": "reply", "id": 2, "heartbeat": HEARTBEAT_MAX}]


def test_a_silent_agent_is_dropped_after_three_intervals_told_and_never_after_55s(tmp_path):
    clock, _engine, factory = make_world(tmp_path)
    peers = agents(factory, 1, 12)
    clock.advance(35.9)  # n12 was told 12 s: 36 s of silence; n1..n11 were told 5..11 s
    assert not peers[12].closed and peers[1].closed and peers[11].closed
    clock.advance(0.2)
    assert peers[12].closed  # aborted (a real transport then tells the engine)
    late = agents(factory, 13, 40)
    assert late[40].received()[0]["heartbeat"] == 40.0
    clock.advance(54.9)  # told 40 s: 3 intervals would be 120 s, the limit is 55 s
    assert not late[40].closed
    clock.advance(0.2)
    assert late[40].closed


def test_over_tls_the_hello_timeout_counts_from_the_end_of_the_handshake(tmp_path):
    clock, _engine, factory = make_world(tmp_path, tls=True)
    peer = Peer(factory)  # TCP accepted: the handshake waits behind thousands of others
    clock.advance(HANDSHAKE_TIMEOUT - 1)
    assert not peer.closed
    peer.proto.handshakeCompleted()
    clock.advance(HELLO_TIMEOUT - 0.1)
    assert not peer.closed
    clock.advance(0.2)
    assert peer.received()[0]["code"] == "out_of_order" and peer.closed
    slow = Peer(factory)
    clock.advance(HANDSHAKE_TIMEOUT + 0.1)  # a handshake that never ends
    assert slow.closed


def test_a_heartbeat_read_in_the_turn_its_limit_passed_keeps_the_session(tmp_path):
    clock, _engine, factory = make_world(tmp_path, rate=0.0)
    [peer] = agents(factory, 1, 1).values()
    peer.received()
    calls = []
    real_call_later = clock.callLater
    clock.callLater = lambda delay, f, *args: calls.append((delay, f, args))  # the reactor is busy
    peer.proto._idle()  # the silence limit passed while cidd was busy ...
    assert calls[-1][0] == 0 and not peer.closed
    clock.callLater = real_call_later
    peer.send({"type": "heartbeat", "id": 2})  # ... the heartbeat waiting on the socket is read first
    _delay, confirm, args = calls[-1]
    confirm(*args)
    assert not peer.closed and peer.received() == [{"type": "reply", "id": 2}]


def test_a_request_answered_in_the_turn_its_timeout_fired_is_answered():
    clock = Clock()
    timed_out = []
    requests = DeferredRequests(clock, lambda pending: timed_out.append(pending.kind) or TimeoutError("late"))
    request_id, d = requests.start("heartbeat", 5.0)
    answers = []
    d.addCallbacks(answers.append, answers.append)
    calls = []
    clock.callLater = lambda delay, f, *args: calls.append((delay, f, args))
    requests._timed_out(request_id)  # the timer fired after a long turn ...
    requests.answer(request_id, {"type": "reply", "id": request_id})  # ... the answer was waiting to be read
    _delay, confirm, args = calls[-1]
    confirm(*args)
    assert answers == [{"type": "reply", "id": request_id}] and timed_out == []
    other_id, other = requests.start("install", None)
    requests._timed_out(other_id)  # no answer came: it fails with on_timeout's error
    calls[-1][1](*calls[-1][2])
    assert other.called and timed_out == ["install"]
    other.addErrback(lambda failure: failure.trap(TimeoutError))


def test_a_switching_node_that_drops_its_session_to_reboot_costs_no_transaction(tmp_path):
    _clock, engine, factory = make_world(tmp_path)
    [agent] = agents(factory, 1, 1).values()
    agent.received()
    admin = client(factory)
    admin.send({"type": "capture", "id": 2, "job": "42", "nodes": "n1", "image": "rocky-9-3"})
    [reboot] = agent.received()
    agent.send({"type": "reply", "id": reboot["id"]})
    statements: list[str] = []
    engine.store.db.set_trace_callback(statements.append)
    agent.proto.connectionLost()  # the node reboots into the installer
    assert not engine.nodes["n1"].online and engine.nodes["n1"].state == "to_installer"
    assert statements == []  # online/mode are forgotten by a restart anyway (machine.restore)
    installer = Peer(factory)
    installer.send(agent_hello(node="n1", mode="installer", image=None, boot="b2"))
    assert "COMMIT" in statements and engine.nodes["n1"].state == "installing"


def test_sessions_that_end_after_the_engine_stopped_are_ignored_quietly(tmp_path):
    _clock, engine, factory = make_world(tmp_path)
    peers = agents(factory, 1, 3)
    engine.stop()  # cidd stops with 10,000 sessions open: each one's end comes after the engine's
    for peer in peers.values():
        peer.proto.connectionLost()
    assert engine.nodes["n1"].online  # the stopped engine took no step
