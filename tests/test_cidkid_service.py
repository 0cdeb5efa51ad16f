"""AgentService (ClientService + hello gate) and its backoff policy, with a fake clock and a fake endpoint."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from cidcommon.wire import encode
from cidinstall.types import InstallRequest, InstallResult, ProgressCallback
from cidkid.platform import Identity, Platform
from cidkid.protocol import AgentProtocol
from cidkid.service import AgentService, Backoff, parse_server
from cidsim.agent_doubles import LoopTransport, MemoryEndpoint


class Node(Platform):
    def identity(self) -> Identity:
        return Identity(node="n1", mode="system", image="img-1-1", boot_id="b1")

    def health(self) -> dict[str, Any]:
        return {"load1": 0.0}

    def reboot(self, boot: str, method: str, spec: object = None) -> None:
        raise AssertionError("not used")

    def install(self, request: InstallRequest, progress: ProgressCallback) -> Deferred[InstallResult]:
        raise AssertionError("not used")


class FixedJitter(random.Random):
    """uniform() always returns the middle of its range: no jitter, so delays are the base delays."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def messages(transport: StringTransport) -> list[dict[str, Any]]:
    lines = transport.value().splitlines()
    transport.clear()
    return [json.loads(line) for line in lines]


def last(endpoint: MemoryEndpoint) -> tuple[Any, LoopTransport]:
    transport = endpoint.transports[-1]
    return transport.protocol, transport


def answer_hello(proto: Any, transport: StringTransport, **fields: Any) -> None:
    hello = messages(transport)[0]
    assert hello["type"] == "hello"
    proto.dataReceived(encode({"type": "reply", "id": hello["id"], "heartbeat": 10.0, "session": "s-1", **fields}))


@pytest.fixture
def twisted_errors() -> Any:
    """Collect the errors Twisted logs (an unhandled NoTransition would show up here)."""
    errors: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    yield errors
    globalLogPublisher.removeObserver(observer)


def make_service(clock: Clock, **kwargs: Any) -> tuple[AgentService, MemoryEndpoint, list[Any]]:
    endpoint = MemoryEndpoint(clock)
    ready: list[Any] = []
    service = AgentService(Node(), endpoint, "tok-XYZZY", clock, server="head:38008",
                           backoff=kwargs.pop("backoff", Backoff(rng=FixedJitter())),
                           on_ready=lambda proto, answer: ready.append((proto, answer)), **kwargs)
    return service, endpoint, ready


# -- backoff ---------------------------------------------------------------------------------------------------

def test_backoff_grows_by_factor_until_the_cap() -> None:
    backoff = Backoff(initial=1.0, factor=1.7, max_delay=60.0, rng=FixedJitter())
    delays = [backoff(n) for n in range(1, 15)]  # ClientService counts failed attempts from 1
    assert delays[0] == pytest.approx(1.0) and delays[1] == pytest.approx(1.7) and delays[2] == pytest.approx(2.89)
    assert all(b >= a for a, b in zip(delays, delays[1:], strict=False))
    assert max(delays) == 60.0 and delays[-1] == 60.0
    assert backoff(10_000) == 60.0  # no overflow for huge attempt counts


def test_backoff_jitter_is_multiplicative_within_half_and_one_and_a_half() -> None:
    backoff = Backoff(rng=random.Random(7))
    for attempt in (0, 3, 8, 30):
        base = backoff.base(attempt)
        samples = [backoff.delay(attempt) for _ in range(2000)]
        assert all(0.5 * base <= s <= 1.5 * base for s in samples)
        assert min(samples) < 0.6 * base and max(samples) > 1.4 * base  # spread over the whole range
    assert len({round(backoff.delay(20), 6) for _ in range(50)}) > 40  # capped delays are jittered too


@given(attempt=st.integers(min_value=0, max_value=10**6), seed=st.integers(), initial=st.floats(0.01, 10),
       factor=st.floats(1.0, 3.0), cap=st.floats(1, 600))
def test_backoff_bounds_hold_for_any_parameters(attempt: int, seed: int, initial: float, factor: float,
                                                cap: float) -> None:
    backoff = Backoff(initial=initial, factor=factor, max_delay=cap, rng=random.Random(seed))
    base = backoff.base(attempt)
    assert base <= cap
    assert 0.5 * base <= backoff.delay(attempt) <= 1.5 * base


def test_hold_off_makes_the_next_delay_the_longest_once() -> None:
    backoff = Backoff(rng=FixedJitter())
    backoff.hold_off("auth")
    assert backoff(1) == 60.0 and backoff.last_reason == "auth"
    assert backoff(1) == pytest.approx(1.0) and backoff.last_reason is None


# -- the service ----------------------------------------------------------------------------------------------

def test_service_is_ready_after_hello_reply_and_reconnects_after_a_drop(twisted_errors: list[Any]) -> None:
    clock = Clock()
    service, endpoint, ready = make_service(clock)
    service.startService()
    connected = service.whenConnected()
    proto, transport = last(endpoint)
    assert not connected.called  # a TCP connection is not enough: hello must be answered
    answer_hello(proto, transport)
    assert connected.called and isinstance(connected.result, AgentProtocol)
    assert len(ready) == 1 and ready[0][1]["session"] == "s-1" and service.protocol is ready[0][0]
    transport.abortConnection()  # e.g. a half-open session found by a heartbeat timeout
    clock.advance(0)
    clock.advance(0.99)
    assert len(endpoint.transports) == 1
    clock.advance(0.01)
    assert len(endpoint.transports) == 2  # first retry after initial delay (1 s, no jitter here)
    answer_hello(*last(endpoint))
    assert len(ready) == 2
    assert twisted_errors == []


def test_refused_connections_back_off_exponentially() -> None:
    clock = Clock()
    service, endpoint, _ready = make_service(clock)
    endpoint.refuse = True
    with capture_logs() as logs:
        service.startService()
        for _ in range(200):
            clock.advance(0.5)
    gaps = [round(b - a, 1) for a, b in zip(endpoint.attempts, endpoint.attempts[1:], strict=False)]
    assert gaps[:5] == [1.0, 2.0, 3.0, 5.0, 8.5]  # 1, 1.7, 2.89, 4.91, 8.35 rounded up to the 0.5 s steps
    assert all(g <= 60.5 for g in gaps)
    assert any(e["event"] == "agent.connect_failed" for e in logs)
    assert any(e["event"] == "agent.retry_scheduled" and e["node"] == "n1" for e in logs)


def test_auth_failure_retries_at_the_longest_delay_and_logs_every_time(twisted_errors: list[Any]) -> None:
    clock = Clock()
    service, endpoint, ready = make_service(clock)
    with capture_logs() as logs:
        service.startService()
        for round_ in range(3):
            proto, transport = last(endpoint)
            hello = messages(transport)[0]
            proto.dataReceived(encode({"type": "error", "id": hello["id"], "code": "auth",
                                       "message": "wrong token for role agent"}))
            clock.advance(0)
            assert transport.closed
            clock.advance(59.9)
            assert len(endpoint.transports) == round_ + 1
            clock.advance(0.1)
            assert len(endpoint.transports) == round_ + 2
    assert ready == []
    assert len([e for e in logs if e["event"] == "agent.auth_failed"]) == 3
    retries = [e for e in logs if e["event"] == "agent.retry_after_auth_failure"]
    assert len(retries) == 3 and all(e["delay"] == 60.0 for e in retries)
    assert "XYZZY" not in repr(logs)
    assert twisted_errors == []  # a refused hello does not confuse ClientService's state machine


def test_session_closed_before_hello_reply_counts_as_a_failed_attempt(twisted_errors: list[Any]) -> None:
    clock = Clock()
    service, endpoint, _ready = make_service(clock)
    service.startService()
    _proto, transport = last(endpoint)
    transport.loseConnection()  # cidd went away before answering
    clock.advance(0)
    clock.advance(1.0)
    assert len(endpoint.transports) == 2
    assert twisted_errors == []


def test_stop_while_waiting_for_hello_aborts_and_stops(twisted_errors: list[Any]) -> None:
    clock = Clock()
    service, endpoint, _ready = make_service(clock)
    service.startService()
    stopped = service.stopService()
    _proto, transport = last(endpoint)
    assert transport.disconnected
    clock.advance(0)
    assert stopped.called
    clock.advance(120)
    assert len(endpoint.transports) == 1
    assert twisted_errors == []


def test_stop_while_connected_closes_gracefully(twisted_errors: list[Any]) -> None:
    clock = Clock()
    service, endpoint, _ready = make_service(clock)
    service.startService()
    answer_hello(*last(endpoint))
    stopped = service.stopService()
    _proto, transport = last(endpoint)
    assert transport.disconnecting and not transport.disconnected  # pending writes are flushed first
    assert not stopped.called
    clock.advance(0)
    assert stopped.called
    clock.advance(120)
    assert len(endpoint.transports) == 1
    assert twisted_errors == []


def test_superseded_session_waits_the_longest_delay(twisted_errors: list[Any]) -> None:
    clock = Clock()
    service, endpoint, _ready = make_service(clock)
    service.startService()
    proto, transport = last(endpoint)
    answer_hello(proto, transport)
    proto.dataReceived(encode({"type": "error", "code": "superseded", "message": "newer session"}))
    clock.advance(0)
    clock.advance(59)
    assert len(endpoint.transports) == 1
    clock.advance(1)
    assert len(endpoint.transports) == 2
    assert twisted_errors == []


@pytest.mark.parametrize("text, expected", [
    ("head01:38008", ("head01", 38008)),
    ("10.0.0.1:9", ("10.0.0.1", 9)),
    ("head01", ("head01", 38008)),
    ("[::1]:4000", ("::1", 4000)),
    ("[fe80::1]", ("fe80::1", 38008)),
    ("::1", ("::1", 38008)),
])
def test_parse_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_server(text) == expected


@pytest.mark.parametrize("text", ["head:0", "head:99999", "head:http", ":38008", "[::1", "[::1]x"])
def test_parse_server_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="server address|port"):
        parse_server(text)
