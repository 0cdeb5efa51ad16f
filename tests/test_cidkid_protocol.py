"""AgentProtocol against docs/protocol.md, driven with StringTransport and a fake clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from cidcommon.errors import AuthError, CidError
from cidcommon.wire import encode
from cidinstall.types import InstallRequest, InstallResult, ProgressCallback
from cidkid import AGENT_VERSION
from cidkid.installs import InstallRunner
from cidkid.platform import Identity, Platform
from cidkid.protocol import HELLO_ANSWER_TIMEOUT, AgentProtocol, RequestTimeout, SessionLost
from cidkid.reboots import REBOOT_METHODS, RebootSpec

TOKEN = "s3cret-agent-token"
HEALTH = {"load1": 0.5, "mem_used_pct": 12.5, "disk_free": 1000, "uptime": 42.0}


class FakePlatform(Platform):
    """Records the commands it gets; installs wait for the test to fire them."""

    reboot_methods = REBOOT_METHODS

    def __init__(self, mode: str = "system", image: str | None = "debian-12-1") -> None:
        self.mode = mode
        self.image = image
        self.reboots: list[tuple[str, str]] = []
        self.specs: list[RebootSpec | None] = []
        self.installs: list[tuple[InstallRequest, ProgressCallback, Deferred[InstallResult]]] = []

    def identity(self) -> Identity:
        return Identity(node="node07", mode=self.mode, image=self.image, boot_id="6f1c-boot")

    def health(self) -> dict[str, Any]:
        return dict(HEALTH)

    def reboot(self, boot: str, method: str, spec: RebootSpec | None = None) -> None:
        self.reboots.append((boot, method))
        self.specs.append(spec)

    def install(self, request: InstallRequest, progress: ProgressCallback) -> Deferred[InstallResult]:
        d: Deferred[InstallResult] = Deferred()
        self.installs.append((request, progress, d))
        return d


def sent(transport: StringTransport) -> list[dict[str, Any]]:
    """Return (and forget) the messages written to ``transport``."""
    lines = transport.value().splitlines()
    transport.clear()
    return [json.loads(line) for line in lines]


def feed(proto: AgentProtocol, message: dict[str, Any]) -> None:
    proto.dataReceived(encode(message))


def connect(platform: Platform | None = None, *, timeout: float = 30.0, installs: InstallRunner | None = None,
            clock: Clock | None = None, **kwargs: Any) -> tuple[AgentProtocol, StringTransport, Clock]:
    clock = clock or Clock()
    proto = AgentProtocol(platform or FakePlatform(), TOKEN, clock, request_timeout=timeout, installs=installs,
                          **kwargs)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def established(platform: Platform | None = None, *, heartbeat: float = 10.0, **kwargs: Any
                ) -> tuple[AgentProtocol, StringTransport, Clock]:
    """Return a session whose hello cidd has answered."""
    proto, transport, clock = connect(platform, **kwargs)
    hello = sent(transport)[0]
    feed(proto, {"type": "reply", "id": hello["id"], "proto": 1, "server": "cidd 0.1.0",
                 "heartbeat": heartbeat, "session": "s-42"})
    return proto, transport, clock


# -- hello -----------------------------------------------------------------------------------------------------

def test_hello_is_the_first_line_and_says_who_the_node_is() -> None:
    _proto, transport, _clock = connect()
    [hello] = sent(transport)
    assert hello == {"type": "hello", "id": hello["id"], "proto": 1, "role": "agent", "token": TOKEN,
                     "node": "node07", "mode": "system", "image": "debian-12-1", "boot_id": "6f1c-boot",
                     "agent": AGENT_VERSION}
    assert AGENT_VERSION.startswith("cidkid ")


def test_hello_reply_fires_ready_with_the_reply() -> None:
    proto, transport, _clock = connect()
    ready = proto.when_ready()
    hello = sent(transport)[0]
    assert not ready.called
    answer = {"type": "reply", "id": hello["id"], "proto": 1, "server": "cidd 0.1.0", "heartbeat": 7.5,
              "session": "s-42", "future_key": [1, 2]}
    with capture_logs() as logs:
        feed(proto, answer)
    assert ready.called and ready.result == answer
    assert proto.heartbeat == 7.5 and proto.session == "s-42" and proto.established
    assert any(e["event"] == "agent.connected" and e["session"] == "s-42" for e in logs)
    # A late caller gets the same outcome at once.
    late = proto.when_ready()
    assert late.called and late.result == answer


def test_auth_error_fails_ready_closes_and_never_logs_the_token() -> None:
    proto, transport, _clock = connect()
    ready = proto.when_ready()
    hello = sent(transport)[0]
    with capture_logs() as logs:
        feed(proto, {"type": "error", "id": hello["id"], "code": "auth", "message": "wrong token for role agent"})
    failures: list[Failure] = []
    ready.addErrback(failures.append)
    assert failures and failures[0].check(AuthError)
    assert failures[0].value.message == "wrong token for role agent"
    assert transport.disconnecting
    [event] = [e for e in logs if e["event"] == "agent.auth_failed"]
    assert event["message"] == "wrong token for role agent"
    assert TOKEN not in repr(logs)


def test_id_less_error_before_hello_reply_answers_the_hello() -> None:
    proto, transport, _clock = connect()
    ready = proto.when_ready()
    sent(transport)
    feed(proto, {"type": "error", "code": "auth", "message": "protocol version 2 is not 1"})
    failures: list[Failure] = []
    ready.addErrback(failures.append)
    assert failures[0].check(AuthError)


def test_unanswered_hello_times_out_and_aborts() -> None:
    proto, transport, clock = connect(timeout=30.0, hello_timeout=45.0)
    ready = proto.when_ready()
    failures: list[Failure] = []
    ready.addErrback(failures.append)
    clock.advance(44.9)
    assert not transport.disconnected and not failures
    clock.advance(0.1)
    assert transport.disconnected
    assert failures[0].check(RequestTimeout) and "within 45 s" in failures[0].value.message


def test_a_busy_cidd_gets_longer_for_hello_than_for_other_requests() -> None:
    proto, transport, clock = connect(timeout=30.0)  # connected: cidd is up, maybe handshaking with thousands
    assert proto.hello_timeout == HELLO_ANSWER_TIMEOUT > 30.0
    clock.advance(HELLO_ANSWER_TIMEOUT - 1)
    assert not transport.disconnected
    hello = sent(transport)[0]
    feed(proto, {"type": "reply", "id": hello["id"], "heartbeat": 10.0})
    assert proto.established


def test_cancelling_ready_aborts_the_connection() -> None:
    proto, transport, _clock = connect()
    ready = proto.when_ready()
    ready.cancel()
    ready.addErrback(lambda f: None)
    assert transport.disconnected


# -- heartbeats and half-open sessions --------------------------------------------------------------------------

def test_heartbeat_sent_every_interval_with_health_figures() -> None:
    proto, transport, clock = established(heartbeat=10.0)
    sent(transport)
    clock.advance(9.9)
    assert sent(transport) == []
    clock.advance(0.1)
    [beat] = sent(transport)
    assert beat["type"] == "heartbeat" and beat == {"type": "heartbeat", "id": beat["id"], **HEALTH}
    feed(proto, {"type": "reply", "id": beat["id"]})
    clock.advance(10.0)
    [beat2] = sent(transport)
    assert beat2["type"] == "heartbeat" and beat2["id"] != beat["id"]
    feed(proto, {"type": "reply", "id": beat2["id"]})
    for _ in range(20):  # answered heartbeats keep the session up indefinitely
        clock.advance(10.0)
        for message in sent(transport):
            feed(proto, {"type": "reply", "id": message["id"]})
    assert not transport.disconnecting and not transport.disconnected


def test_unanswered_heartbeat_aborts_after_the_request_timeout() -> None:
    proto, transport, clock = established(heartbeat=10.0, timeout=5.0)
    sent(transport)
    clock.advance(10.0)
    [beat] = sent(transport)
    assert beat["type"] == "heartbeat"
    with capture_logs() as logs:
        clock.advance(4.9)
        assert not transport.disconnected
        clock.advance(0.1)
    assert transport.disconnected  # abortConnection: a half-open session is not flushed politely
    assert [e["request"] for e in logs if e["event"] == "agent.request_timeout"] == ["heartbeat"]


def test_silence_for_three_heartbeats_aborts() -> None:
    proto, transport, clock = established(heartbeat=10.0, timeout=1000.0)
    with capture_logs() as logs:
        clock.pump([1.0] * 29)  # one second at a time, as a real reactor would run
        assert not transport.disconnected
        assert [m["type"] for m in sent(transport)] == ["heartbeat", "heartbeat"]  # sent, never answered
        clock.advance(1)
    assert transport.disconnected
    [event] = [e for e in logs if e["event"] == "agent.server_silent"]
    assert event["limit"] == 30.0


def test_any_received_line_counts_as_life() -> None:
    proto, transport, clock = established(heartbeat=10.0, timeout=1000.0)
    for _ in range(10):
        clock.advance(9.0)
        proto.dataReceived(b"\n")  # even an empty line proves the server is there
    assert not transport.disconnected


def test_bad_heartbeat_interval_falls_back_to_default() -> None:
    proto, transport, clock = connect()
    hello = sent(transport)[0]
    feed(proto, {"type": "reply", "id": hello["id"], "heartbeat": "soon"})
    assert proto.heartbeat == 10.0
    clock.advance(10.0)
    assert [m["type"] for m in sent(transport)] == ["heartbeat"]


def test_a_heartbeat_answer_with_an_interval_changes_the_interval() -> None:
    proto, transport, clock = established(heartbeat=10.0, timeout=1000.0)
    sent(transport)
    clock.advance(10.0)
    [beat] = sent(transport)
    with capture_logs() as logs:
        feed(proto, {"type": "reply", "id": beat["id"], "heartbeat": 30.0})  # cidd serves many agents
    assert proto.heartbeat == 30.0
    assert [(e["old"], e["new"]) for e in logs if e["event"] == "agent.heartbeat_changed"] == [(10.0, 30.0)]
    clock.advance(10.0)  # the heartbeat scheduled before the answer keeps its time...
    [beat2] = sent(transport)
    feed(proto, {"type": "reply", "id": beat2["id"]})  # an answer without the key changes nothing
    clock.advance(29.9)  # ... the next ones follow the new interval
    assert sent(transport) == []
    clock.advance(0.1)
    [beat3] = sent(transport)
    for bad in ("soon", 0, -5, True, None):
        feed(proto, {"type": "reply", "id": beat3["id"], "heartbeat": bad})
        assert proto.heartbeat == 30.0
    clock.pump([1.0] * 89)  # silence is now judged against 3 x 30 s
    assert not transport.disconnected
    clock.advance(1.0)
    assert transport.disconnected


def test_silence_is_confirmed_after_what_waits_is_read() -> None:
    proto, transport, clock = established(heartbeat=10.0, timeout=1000.0)
    calls = []
    clock.callLater = lambda delay, f, *args: calls.append((delay, f, args))  # a reactor that never gets to run
    proto._last_received -= 100  # the agent's reactor was busy for a long time: the tick finds cidd silent...
    proto._tick()
    assert calls[-1][0] == 0 and not transport.disconnected  # ... and looks again after the next reads
    proto.dataReceived(b"\n")  # what was waiting on the socket
    _delay, again, args = calls[-1]
    again(*args)
    assert not transport.disconnected


def test_connection_lost_fails_pending_requests_and_stops_heartbeats() -> None:
    proto, transport, clock = established()
    sent(transport)
    pending = proto.request("heartbeat")
    sent(transport)
    failures: list[Failure] = []
    pending.addErrback(failures.append)
    proto.connectionLost(Failure(ConnectionDone()))
    assert failures[0].check(SessionLost)
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert sent(transport) == []


def test_error_reply_fails_the_pending_request() -> None:
    proto, transport, _clock = established()
    sent(transport)
    d = proto.request("heartbeat", load1=1.0)
    [beat] = sent(transport)
    feed(proto, {"type": "error", "id": beat["id"], "code": "internal", "message": "bug in cidd"})
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures[0].check(CidError) and failures[0].value.code == "internal"
    assert not transport.disconnecting


def test_superseded_logs_and_closes() -> None:
    called: list[bool] = []
    proto, transport, _clock = established(on_superseded=lambda: called.append(True))
    with capture_logs() as logs:
        feed(proto, {"type": "error", "code": "superseded", "message": "a newer session for node07 took over"})
    assert transport.disconnecting and called == [True]
    assert any(e["event"] == "agent.superseded" for e in logs)


# -- commands from cidd ------------------------------------------------------------------------------------------

def test_reboot_replies_first_then_calls_the_platform() -> None:
    platform = FakePlatform()
    proto, transport, clock = established(platform)
    sent(transport)
    feed(proto, {"type": "reboot", "id": "c-9", "boot": "installer", "method": "reboot", "unknown": True})
    assert sent(transport) == [{"type": "reply", "id": "c-9"}]
    assert platform.reboots == []  # not before the reply is out
    clock.advance(0)
    assert platform.reboots == [("installer", "reboot")]


@pytest.mark.parametrize("fields, words", [
    ({"boot": "floppy"}, "'boot' must be one of"),
    ({"boot": "disk", "method": "warp"}, "cannot reboot with method 'warp'"),
    ({"boot": "disk", "method": "kexec"}, "a kexec reboot needs 'kernel'"),
    ({"boot": "disk", "method": "grub_reboot"}, "a grub_reboot reboot needs 'entry'"),
    ({"boot": "disk", "method": "efi_bootnext", "entry": "debian"}, "hexadecimal EFI boot number"),
    ({}, "needs a 'boot' field"),
])
def test_reboot_with_bad_fields_is_refused(fields: dict[str, Any], words: str) -> None:
    platform = FakePlatform()
    proto, transport, clock = established(platform)
    sent(transport)
    feed(proto, {"type": "reboot", "id": 3, **fields})
    [answer] = sent(transport)
    assert answer["type"] == "error" and answer["id"] == 3 and answer["code"] == "bad_request"
    assert words in answer["message"]
    clock.advance(1)
    assert platform.reboots == []


def test_reboot_passes_what_to_boot_to_the_platform() -> None:
    platform = FakePlatform()
    proto, transport, clock = established(platform)
    sent(transport)
    feed(proto, {"type": "reboot", "id": 4, "boot": "installer", "method": "kexec", "kernel": "http://h/k",
                 "initrd": "http://h/i", "cmdline": "cid.node=node07"})
    feed(proto, {"type": "reboot", "id": 5, "boot": "disk", "method": "efi_bootnext", "entry": "0003"})
    assert [m["type"] for m in sent(transport)] == ["reply", "reply"]
    clock.advance(0)
    assert platform.reboots == [("installer", "kexec"), ("disk", "efi_bootnext")]
    assert platform.specs == [RebootSpec(kernel="http://h/k", initrd="http://h/i", cmdline="cid.node=node07"),
                              RebootSpec(entry="0003")]


INSTALL = {"type": "install", "id": "c-10", "image": "debian-12-1", "url": "http://head:38080/i/debian-12-1.tar.zst",
           "sha256": "3a" * 32, "size": 524288000, "format": "tar.zst"}


def test_install_in_system_mode_is_refused() -> None:
    platform = FakePlatform(mode="system")
    proto, transport, _clock = established(platform)
    sent(transport)
    feed(proto, INSTALL)
    [answer] = sent(transport)
    assert answer["type"] == "error" and answer["id"] == "c-10" and answer["code"] == "bad_request"
    assert "installer" in answer["message"]
    assert platform.installs == []


def test_install_in_installer_mode_replies_reports_progress_and_outcome() -> None:
    platform = FakePlatform(mode="installer", image=None)
    proto, transport, clock = established(platform)
    sent(transport)
    feed(proto, INSTALL)
    assert sent(transport) == [{"type": "reply", "id": "c-10"}]
    [(request, progress, done)] = platform.installs
    assert request == InstallRequest(image="debian-12-1", url=INSTALL["url"], sha256="3a" * 32, size=524288000,
                                     format="tar.zst")
    progress("writing", 0, 1000)
    progress("writing", 100, 1000)  # within 0.5 s of the previous one: dropped
    [first] = sent(transport)
    assert first == {"type": "progress", "image": "debian-12-1", "step": "writing", "done": 0, "total": 1000}
    clock.advance(0.5)
    progress("writing", 500, 1000)
    [second] = sent(transport)
    assert second["done"] == 500 and second["rate"] == 1000.0
    progress("writing", 1000, 1000)  # the last one always goes out
    assert sent(transport)[0]["done"] == 1000
    done.callback(InstallResult(ok=True))
    assert sent(transport) == [{"type": "installed", "image": "debian-12-1", "ok": True}]


def test_failed_install_says_why_and_whether_to_retry() -> None:
    platform = FakePlatform(mode="installer", image=None)
    proto, transport, _clock = established(platform)
    feed(proto, INSTALL)
    sent(transport)
    platform.installs[0][2].callback(InstallResult(ok=False, reason="checksum mismatch", retry=False))
    assert sent(transport) == [{"type": "installed", "image": "debian-12-1", "ok": False,
                                "reason": "checksum mismatch", "retry": False}]


def test_install_missing_url_is_a_bad_request() -> None:
    platform = FakePlatform(mode="installer", image=None)
    proto, transport, _clock = established(platform)
    sent(transport)
    feed(proto, {k: v for k, v in INSTALL.items() if k != "url"})
    [answer] = sent(transport)
    assert answer["code"] == "bad_request" and "'url'" in answer["message"]


def test_second_install_of_another_image_is_refused_same_image_is_joined() -> None:
    platform = FakePlatform(mode="installer", image=None)
    proto, transport, _clock = established(platform)
    feed(proto, INSTALL)
    sent(transport)
    feed(proto, {**INSTALL, "id": "c-11"})
    assert sent(transport) == [{"type": "reply", "id": "c-11", "running": True}]
    feed(proto, {**INSTALL, "id": "c-12", "image": "rocky-9-1"})
    [answer] = sent(transport)
    assert answer["code"] == "bad_request" and "already running" in answer["message"]
    assert len(platform.installs) == 1


def test_install_outcome_reaches_cidd_through_the_next_session() -> None:
    platform = FakePlatform(mode="installer", image=None)
    clock = Clock()
    runner = InstallRunner(platform, clock, node="node07")
    proto, transport, _ = established(platform, installs=runner, clock=clock)
    feed(proto, INSTALL)
    proto.connectionLost(Failure(ConnectionDone()))
    platform.installs[0][2].callback(InstallResult(ok=True))  # finished while disconnected
    proto2, transport2, _ = established(platform, installs=runner, clock=clock)
    assert {"type": "installed", "image": "debian-12-1", "ok": True} in sent(transport2)


def test_crashing_platform_install_becomes_a_failed_result() -> None:
    class Crashing(FakePlatform):
        def install(self, request: InstallRequest, progress: ProgressCallback) -> Deferred[InstallResult]:
            raise RuntimeError("disk exploded")

    proto, transport, _clock = established(Crashing(mode="installer", image=None))
    sent(transport)
    feed(proto, INSTALL)
    reply, installed = sent(transport)
    assert reply == {"type": "reply", "id": "c-10"}
    assert installed["ok"] is False and installed["retry"] is False and "disk exploded" in installed["reason"]


# -- bad input -----------------------------------------------------------------------------------------------------

def test_unknown_type_gets_unknown_type_error() -> None:
    proto, transport, _clock = established()
    sent(transport)
    feed(proto, {"type": "format_disk", "id": 44})
    [answer] = sent(transport)
    assert answer["type"] == "error" and answer["id"] == 44 and answer["code"] == "unknown_type"
    assert "format_disk" in answer["message"]


def test_garbage_lines_get_bad_message_and_the_session_stays_open() -> None:
    proto, transport, _clock = established()
    sent(transport)
    proto.dataReceived(b"this is not json\n[1, 2]\n{\"id\": 5}\n")
    answers = sent(transport)
    assert [a["code"] for a in answers] == ["bad_message"] * 3
    assert "id" not in answers[0] and "id" not in answers[1]
    assert answers[2]["id"] == 5  # the id could be read, so the error names it
    assert not transport.disconnecting
    feed(proto, {"type": "reboot", "id": 6, "boot": "disk"})  # still working
    assert sent(transport) == [{"type": "reply", "id": 6}]


def test_request_before_hello_reply_is_out_of_order() -> None:
    proto, transport, _clock = connect()
    sent(transport)
    feed(proto, {"type": "reboot", "id": 2, "boot": "disk"})
    [answer] = sent(transport)
    assert answer["code"] == "out_of_order" and answer["id"] == 2


def test_oversized_line_gets_too_long_and_closes() -> None:
    proto, transport, _clock = established()
    sent(transport)
    proto.dataReceived(b"{" + b"x" * 70000)
    [answer] = sent(transport)
    assert answer["type"] == "error" and answer["code"] == "too_long"
    assert transport.disconnecting
    proto.dataReceived(b"\n" + encode({"type": "reboot", "id": 9, "boot": "disk"}))
    assert sent(transport) == []  # nothing more is read from a closed session


def test_line_split_across_packets_is_reassembled() -> None:
    proto, transport, _clock = established()
    sent(transport)
    data = encode({"type": "reboot", "id": 8, "boot": "disk"})
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])
    assert sent(transport) == [{"type": "reply", "id": 8}]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=200).filter(lambda b: b"\n" not in b),
    st.dictionaries(st.sampled_from(["type", "id", "boot", "method", "image", "url", "size", "code"]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                              st.text(max_size=20), st.sampled_from(["reboot", "install", "reply", "error",
                                                                     "heartbeat", "disk", "installer"])),
                    max_size=6).map(lambda d: json.dumps(d).encode()),
), max_size=12), st.sampled_from(["system", "installer"]))
def test_any_input_gets_answers_never_an_exception(lines: list[bytes], mode: str) -> None:
    platform = FakePlatform(mode=mode)
    proto, transport, clock = established(platform)
    sent(transport)
    proto.dataReceived(b"\n".join(lines) + b"\n")
    clock.advance(0)
    for answer in sent(transport):  # everything the agent wrote is a well-formed message
        assert answer["type"] in ("reply", "error", "installed", "progress")
        if answer["type"] == "error":
            assert isinstance(answer["code"], str) and isinstance(answer["message"], str)


# -- installs are idempotent within a boot (a second run would empty what the first one wrote) -------------------

def test_install_of_an_image_already_installed_in_this_boot_answers_its_result_and_never_runs_again() -> None:
    platform = FakePlatform(mode="installer", image=None)
    clock = Clock()
    runner = InstallRunner(platform, clock, node="node07")
    proto, transport, _ = established(platform, installs=runner, clock=clock)
    feed(proto, {**INSTALL, "attempt": 1})
    proto.connectionLost(Failure(ConnectionDone()))
    platform.installs[0][2].callback(InstallResult(ok=True))  # finished while cidd was away
    proto2, transport2, _ = connect(platform, installs=runner, clock=clock)
    [hello] = sent(transport2)
    assert hello["install"] == {"image": "debian-12-1", "state": "ok", "attempt": 1}  # cidd reads this first
    feed(proto2, {"type": "reply", "id": hello["id"], "heartbeat": 10.0})
    assert {"type": "installed", "image": "debian-12-1", "ok": True, "attempt": 1} in sent(transport2)
    feed(proto2, {**INSTALL, "id": "c-20", "attempt": 1})  # an old cidd re-sending the same install
    assert sent(transport2) == [{"type": "reply", "id": "c-20", "done": True},
                                {"type": "installed", "image": "debian-12-1", "ok": True, "attempt": 1}]
    feed(proto2, {**INSTALL, "id": "c-21", "attempt": 2})  # even a later attempt: it is installed
    assert sent(transport2)[0] == {"type": "reply", "id": "c-21", "done": True}
    assert len(platform.installs) == 1


def test_hello_says_an_install_is_running_and_a_failed_one_runs_again_only_for_a_later_attempt() -> None:
    platform = FakePlatform(mode="installer", image=None)
    clock = Clock()
    runner = InstallRunner(platform, clock, node="node07")
    proto, _transport, _ = established(platform, installs=runner, clock=clock)
    feed(proto, {**INSTALL, "attempt": 1})
    proto.connectionLost(Failure(ConnectionDone()))
    _proto2, transport2, _ = connect(platform, installs=runner, clock=clock)
    assert sent(transport2)[0]["install"] == {"image": "debian-12-1", "state": "running", "attempt": 1}
    platform.installs[0][2].callback(InstallResult(ok=False, reason="disk error", retry=True))
    assert runner.status() == {"image": "debian-12-1", "state": "failed", "attempt": 1, "reason": "disk error",
                               "retry": True}
    assert runner.decide(InstallRequest("debian-12-1", "http://h/x"), 1) == "done"
    assert runner.decide(InstallRequest("debian-12-1", "http://h/x"), 2) == "start"
    assert runner.decide(InstallRequest("rocky-9-1", "http://h/y"), 1) == "start"


def test_an_install_request_never_shows_the_agent_token() -> None:
    request = InstallRequest("debian-12-1", "http://h/x", agent_token="n0de-s3cret")
    assert "n0de-s3cret" not in repr(request) and "n0de-s3cret" not in str(request)
    assert request.agent_token == "n0de-s3cret"
