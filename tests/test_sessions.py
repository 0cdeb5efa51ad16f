"""cidd's session layer with StringTransport and a Clock: every message kind, garbage, auth, liveness."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from cidcatalog.catalog import load_catalog
from cidcommon.paths import node_token
from cidd.config import parse_config
from cidd.engine import Engine
from cidd.sessions import HELLO_TIMEOUT, CiddFactory, Sessions
from cidd.store import Store
from tests.fakes import TOKENS, Peer, agent_hello, client

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    clock.advance(1000)
    config = parse_config({"state_dir": str(tmp_path), "heartbeat": 5, "request_timeout": 7,
                           "groups": {"default": {"ladder": [{"method": "reboot", "timeout": 50}]}}})
    store = Store(":memory:")
    sessions = Sessions()
    engine = Engine(config, load_catalog(REPO / "images.yaml"), store, clock, sessions)
    engine.start()
    factory = CiddFactory(engine, sessions, TOKENS, clock)
    return clock, engine, factory


def test_agent_hello_is_accepted_and_the_node_becomes_ready(world):
    _clock, engine, factory = world
    peer = Peer(factory)
    peer.send(agent_hello())
    [reply] = peer.received()
    assert reply["type"] == "reply" and reply["id"] == 1 and reply["proto"] == 1 and reply["heartbeat"] == 5
    assert engine.nodes["n1"].state == "ready" and engine.nodes["n1"].image == "debian-12-1"


@pytest.mark.parametrize("hello, text", [
    (agent_hello(token="wrong"), "authentication failed"),
    ({**agent_hello(), "token": None}, "authentication failed"),
    ({**agent_hello(), "token": "agent-secret"}, "not node n1's agent token"),  # the master is no node's token
    (agent_hello(token=node_token("agent-secret", "n2")), "not node n1's agent token"),  # another node's token
    ({**agent_hello(), "role": "root"}, "authentication failed"),
    ({**agent_hello(), "role": "agent", "token": "admin-secret"}, "authentication failed"),  # another role's token
    ({**agent_hello(), "proto": 9}, "protocol version"),
])
def test_unauthenticated_peers_get_an_error_and_are_disconnected(world, hello, text):
    _clock, engine, factory = world
    peer = Peer(factory)
    peer.send(hello)
    [error] = peer.received()
    assert error["type"] == "error" and error["code"] == "auth" and text in error["message"]
    assert peer.closed
    assert "n1" not in engine.nodes


def test_anything_before_hello_is_out_of_order_and_closes(world):
    peer = Peer(world[2])
    peer.send({"type": "status", "id": 4})
    [error] = peer.received()
    assert error["code"] == "out_of_order" and error["id"] == 4 and peer.closed


def test_a_silent_peer_is_dropped_after_the_hello_timeout(world):
    clock, _engine, factory = world
    peer = Peer(factory)
    clock.advance(HELLO_TIMEOUT + 0.1)
    assert peer.received()[0]["code"] == "out_of_order" and peer.closed


def test_garbage_lines_get_errors_and_too_many_close_the_session(world):
    peer = client(world[2])
    for line in (b"not json\n", b"[1,2]\n", b'{"no_type": 1}\n', b'{"type": "status", "id": [1]}\n'):
        peer.send(line)
    errors = peer.received()
    assert [e["code"] for e in errors] == ["bad_message"] * 4
    assert not peer.closed
    for _ in range(6):
        peer.send(b"\xff\xfe\n")
    assert peer.closed


def test_an_oversized_line_is_refused_and_closes_only_that_session(world):
    _clock, engine, factory = world
    other = client(factory)
    peer = client(factory)
    peer.send(b"{" + b" " * 70000)
    assert peer.received()[0]["code"] == "too_long" and peer.closed
    other.send({"type": "status", "id": 2})
    assert other.received()[0]["type"] == "reply"


def test_unknown_request_type_and_second_hello(world):
    peer = client(world[2])
    peer.send({"type": "format_disks", "id": 3})
    peer.send({"type": "hello", "id": 4, "proto": 1, "role": "admin", "token": "admin-secret"})
    unknown, again = peer.received()
    assert unknown["code"] == "unknown_type" and unknown["id"] == 3
    assert again["code"] == "out_of_order"


def test_heartbeat_is_answered_and_silence_drops_the_agent(world):
    clock, engine, factory = world
    peer = Peer(factory)
    peer.send(agent_hello())
    peer.received()
    clock.advance(4)
    peer.send({"type": "heartbeat", "id": 2, "load1": 0.5, "mem_used_pct": 10.0, "disk_free": 123})
    assert peer.received() == [{"type": "reply", "id": 2}]
    assert engine.node_status("n1")["health"]["disk_free"] == 123
    clock.advance(14)  # < 3 x heartbeat since the last line
    assert not peer.closed
    clock.advance(2)  # half-open: nothing for 3 x heartbeat
    assert peer.transport.disconnecting or peer.closed or getattr(peer.transport, "aborting", False)


def test_newest_agent_session_wins(world):
    _clock, engine, factory = world
    old = Peer(factory)
    old.send(agent_hello(boot="b1"))
    new = Peer(factory)
    new.send(agent_hello(boot="b1"))
    assert old.received()[-1]["code"] == "superseded" and old.closed
    old.proto.connectionLost()
    assert factory.sessions.agents["n1"] is new.proto
    assert engine.nodes["n1"].online


def test_full_switch_through_sessions(world):
    clock, engine, factory = world
    agent = Peer(factory)
    agent.send(agent_hello())
    agent.received()
    admin = client(factory)
    admin.send({"type": "capture", "id": 2, "job": "42", "nodes": "n1", "image": "rocky-9-3", "watch": True})
    [reply] = admin.received()
    assert reply["capture"]["nodes"]["n1"]["state"] == "to_installer" and reply["capture"]["attached"] is False
    [reboot] = agent.received()
    assert reboot["type"] == "reboot" and reboot["boot"] == "installer"
    agent.send({"type": "reply", "id": reboot["id"]})
    agent.proto.connectionLost()
    installer = Peer(factory)
    installer.send(agent_hello(mode="installer", image=None, boot="b2"))
    reply, install = installer.received()
    assert install["type"] == "install" and install["image"] == "rocky-9-3" and install["url"].endswith(".tar.zst")
    installer.send({"type": "reply", "id": install["id"]})
    installer.send({"type": "progress", "image": "rocky-9-3", "step": "writing", "done": 5, "total": 10})
    installer.send({"type": "installed", "image": "rocky-9-3", "ok": True})
    [to_disk] = installer.received()
    assert to_disk["type"] == "reboot" and to_disk["boot"] == "disk"
    installer.proto.connectionLost()
    system = Peer(factory)
    system.send(agent_hello(image="rocky-9-3", boot="b3"))
    clock.advance(0)
    events = admin.received()
    kinds = [(e["type"], e.get("to")) for e in events]
    assert ("progress", None) in kinds
    assert [e["to"] for e in events if e["type"] == "node"] == ["installing", "to_image", "ready"]
    assert events[-1]["type"] == "done" and events[-1]["state"] == "ok"
    clock.advance(20)
    assert {"type": "keepalive"} not in admin.received()  # keepalives stop with the capture


def test_agent_error_reply_climbs_the_ladder_and_a_timeout_aborts(world):
    clock, engine, factory = world
    agent = Peer(factory)
    agent.send(agent_hello())
    agent.received()
    engine.capture("7", ["n1"], "rocky-9-3", None, "admin", 600)
    [reboot] = agent.received()
    agent.send({"type": "error", "id": reboot["id"], "code": "bad_request", "message": "no reboot here"})
    node = engine.nodes["n1"]
    assert node.state == "failed" and "no reboot here" in node.reason  # one rung only in this config


def test_reader_may_read_but_not_capture(world):
    peer = client(world[2], role="reader")
    peer.send({"type": "capture", "id": 2, "job": "1", "nodes": "n1", "image": "rocky-9-3"})
    peer.send({"type": "status", "id": 3})
    peer.send({"type": "captures", "id": 4})
    refused, status, captures = peer.received()
    assert refused["code"] == "forbidden" and status["type"] == "reply" and captures["captures"] == []


def test_capture_request_errors(world):
    _clock, engine, factory = world
    agent = Peer(factory)
    agent.send(agent_hello())
    peer = client(factory)
    peer.send({"type": "capture", "id": 2, "job": "1", "nodes": "n1", "image": "debian-13-1"})
    peer.send({"type": "capture", "id": 3, "job": "1", "nodes": "n[1-", "image": "rocky-9-3"})
    peer.send({"type": "capture", "id": 4, "job": "1", "nodes": "zz9", "image": "rocky-9-3"})
    peer.send({"type": "capture", "id": 5, "nodes": "n1", "image": "rocky-9-3"})
    peer.send({"type": "capture", "id": 6, "job": "1", "nodes": "n1", "image": "rocky-9-3", "timeout": "soon"})
    codes = [(e["id"], e["code"]) for e in peer.received()]
    assert codes == [(2, "unknown_image"), (3, "bad_hostlist"), (4, "unknown_node"), (5, "bad_request"),
                     (6, "bad_request")]
    assert engine.captures == {}


def test_cancel_rights_admin_or_the_scheduler_for_the_captures_own_user(world):
    _clock, engine, factory = world
    agent = Peer(factory)
    agent.send(agent_hello())
    scheduler = client(factory, role="scheduler")
    scheduler.send({"type": "capture", "id": 2, "job": "77", "nodes": "n1", "image": "rocky-9-3", "user": "alice"})
    assert scheduler.received()[0]["capture"]["state"] == "running"
    reader = client(factory, role="reader")
    reader.send({"type": "cancel", "id": 3, "job": "77", "user": "alice"})
    reader.send({"type": "cancel", "id": 4, "job": "nosuch"})  # refused before saying whether the job exists
    assert [(e["code"], "may not cancel captures" in e["message"]) for e in reader.received()] == [
        ("forbidden", True), ("forbidden", True)]
    scheduler.send({"type": "cancel", "id": 5, "job": "77", "user": "bob"})
    [refused] = scheduler.received()
    assert refused["code"] == "forbidden"
    assert "user bob may not cancel the capture of job 77: it was started by user alice" in refused["message"]
    assert engine.captures["77"].running  # nothing happened
    scheduler.send({"type": "cancel", "id": 6, "job": "77", "user": "alice"})
    [cancelled] = scheduler.received()
    [row] = [row for row in engine.store.events(job="77") if row["to"] == "cancelled"]
    assert row["node"] == "n1" and row["detail"].startswith("cancelled by alice: ")
    assert cancelled["already"] is False and cancelled["capture"]["state"] == "cancelled"
    assert cancelled["capture"]["cancelled_by"] == "alice"
    admin = client(factory)
    admin.send({"type": "cancel", "id": 7, "job": "77", "user": "root"})  # a second cancel is fine
    admin.send({"type": "cancel", "id": 8, "job": "nosuch"})
    again, unknown = admin.received()
    assert again["already"] is True and again["capture"]["cancelled_by"] == "alice"
    assert unknown["code"] == "bad_request" and "job nosuch has no capture; nothing to cancel" in unknown["message"]


def test_images_hides_the_private_images_of_other_users_but_not_from_admin(world):
    from cidcatalog.catalog import Image

    _clock, engine, factory = world
    engine.catalog = engine.catalog.with_image(Image("alicefs", "1", "1", "alicefs-1-1.tar.zst", os="debian 12",
                                                     owner="alice", visibility="private"))
    shared = sorted(image_id for image_id in engine.catalog if image_id != "alicefs-1-1")
    reader = client(factory, role="reader")
    reader.send({"type": "images", "id": 2, "user": "alice"})  # a reader's token proves no user
    [seen] = reader.received()
    assert [row["id"] for row in seen["images"]] == shared and seen["hidden"] == 1
    assert "unavailable" not in seen
    scheduler = client(factory, role="scheduler")
    scheduler.send({"type": "images", "id": 3, "user": "bob"})
    scheduler.send({"type": "images", "id": 4, "user": "alice"})  # the scheduler vouches for the user it names
    bob, alice = scheduler.received()
    assert "alicefs-1-1" not in [row["id"] for row in bob["images"]] and bob["hidden"] == 1
    [own] = [row for row in alice["images"] if row["id"] == "alicefs-1-1"]
    assert (own["owner"], own["visibility"], own["os"], own["name"]) == ("alice", "private", "debian 12", "alicefs")
    assert own["size"] is None and own["date"] is None  # no file in the image directory
    admin = client(factory)
    admin.send({"type": "images", "id": 5})
    [everything] = admin.received()
    assert len(everything["images"]) == len(shared) + 1 and everything["hidden"] == 0
    assert everything["unavailable"] == []


def test_features_request_returns_the_scheduler_map(tmp_path):
    clock = Clock()
    config = parse_config({"state_dir": str(tmp_path), "scheduler": {
        "features": {"img_debian12": "debian-12-1", "img_rocky9": "rocky-9-3"}, "default_image": "debian-12-1"}})
    engine = Engine(config, load_catalog(REPO / "images.yaml"), Store(":memory:"), clock, Sessions())
    engine.start()
    peer = client(CiddFactory(engine, engine.link, TOKENS, clock), role="reader")
    peer.send({"type": "features", "id": 9})
    [reply] = peer.received()
    assert reply["features"] == {"img_debian12": "debian-12-1", "img_rocky9": "rocky-9-3"}
    assert reply["default_image"] == "debian-12-1"


def installer_hello(node="n1", boot_token=None, resume_token=None, boot="i1", mode="installer") -> dict:
    hello = {"type": "hello", "id": 1, "proto": 1, "role": "agent", "node": node, "mode": mode, "image": None,
             "boot_id": boot}
    if boot_token is not None:
        hello["boot_token"] = boot_token
    if resume_token is not None:
        hello["resume_token"] = resume_token
    return hello


def test_installer_boot_tokens_are_single_use_expire_and_resume(world):
    clock, engine, factory = world
    agent = Peer(factory)
    agent.send(agent_hello())
    engine.capture("9", ["n1"], "rocky-9-3", None, "admin", 3600)  # SetBoot(installer) mints a boot token
    token, expires = engine.netboot.tokens["n1"]
    assert expires == clock.seconds() + 7200.0
    agent.proto.connectionLost()
    first = Peer(factory)
    first.send(installer_hello(boot_token=token))
    [reply] = [m for m in first.received() if m["type"] == "reply"]
    resume = reply["resume_token"]
    assert engine.nodes["n1"].state == "installing"
    assert engine.netboot.tokens["n1"][0] != token  # the next installer boot gets a token of its own
    first.proto.connectionLost()
    replay = Peer(factory)
    replay.send(installer_hello(boot_token=token, boot="i9"))
    [error] = replay.received()
    assert error["code"] == "auth" and "already used" in error["message"] and replay.closed
    again = Peer(factory)
    again.send(installer_hello(resume_token=resume))  # the same installer reconnecting
    assert again.received()[0]["type"] == "reply" and engine.nodes["n1"].online
    system = Peer(factory)
    system.send(installer_hello(resume_token=resume, mode="system"))
    assert system.received()[0]["code"] == "auth"  # tokens are for the installer only
    stale, _ = engine.netboot.tokens["n1"]
    clock.advance(7201)
    late = Peer(factory)
    late.send(installer_hello(boot_token=stale, boot="i3"))
    assert "expired" in late.received()[0]["message"]
    engine.netboot.set_boot("n1", "disk")  # leaving the installer withdraws every token
    gone = Peer(factory)
    gone.send(installer_hello(resume_token=resume, boot="i4"))
    assert gone.received()[0]["code"] == "auth" and "n1" not in engine.netboot.tokens


def test_deeply_nested_json_is_a_protocol_error_not_a_crash(world):
    peer = client(world[2])
    peer.send(b"[" * 50000 + b"\n")
    [error] = peer.received()
    assert error["code"] == "bad_message" and "too deeply" in error["message"] and not peer.closed


def test_thousands_of_fuzzed_sessions_leave_no_memory_behind(world):
    """tracemalloc, not RSS: Python objects kept per bad session would show here (logs go to /dev/null)."""
    import gc
    import os
    import random
    import tracemalloc

    from cidcommon import logs
    from tests.test_fuzz import mutate

    clock, _engine, factory = world
    rng = random.Random(5)
    with open(os.devnull, "w") as devnull:
        logs.configure(stream=devnull)

        def run(count: int) -> None:
            for _ in range(count):
                peer = Peer(factory)
                if rng.random() < 0.5:
                    peer.send({"type": "hello", "id": 1, "proto": 1, "role": "admin", "token": "admin-secret"})
                for _ in range(rng.randrange(1, 20)):
                    if peer.closed:
                        break
                    peer.send(mutate(rng))
                peer.proto.connectionLost()
                peer.transport.clear()
                clock.advance(11)

        run(500)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            run(2000)
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            logs.configure()
    assert growth < 256 * 1024, f"{growth} bytes kept after 2,000 fuzzed sessions"


# -- TLS: the verified client certificate binds an agent to its node ---------------------------------------------------

class CertPeer(Peer):
    """A Peer whose TLS handshake completed with a client certificate for ``cn`` (None: no certificate)."""

    def __init__(self, factory: CiddFactory, cn: str | None) -> None:
        from OpenSSL import crypto

        from cidd.pki import create_ca, issue

        super().__init__(factory)
        x509 = None
        if cn is not None:
            ca_key, ca_cert = create_ca()
            x509 = crypto.X509.from_cryptography(issue(ca_key, ca_cert, cn, server=False)[1])
        self.transport.getPeerCertificate = lambda: x509  # type: ignore[attr-defined]
        self.proto.handshakeCompleted()


@pytest.fixture
def tls_world(world):
    clock, engine, factory = world
    factory.tls, factory.client_certs = True, "required"
    return clock, engine, factory


def test_agent_certificate_for_another_node_is_refused(tls_world):
    _clock, engine, factory = tls_world
    liar = CertPeer(factory, "n1")
    assert liar.proto.peer_cert_node == "n1"
    liar.send(agent_hello(node="n2"))
    [error] = liar.received()
    assert error["code"] == "auth" and "certificate is for node 'n1'" in error["message"] and liar.closed
    assert "n2" not in engine.nodes and factory.security.counts["security.node_mismatch"] == 1
    honest = CertPeer(factory, "n1")
    honest.send(agent_hello(node="n1"))
    assert honest.received()[0]["type"] == "reply" and engine.nodes["n1"].state == "ready"


def test_required_client_certificate_for_agents_but_not_for_clients_or_installers(tls_world):
    _clock, engine, factory = tls_world
    bare = CertPeer(factory, None)
    bare.send(agent_hello(node="n1"))
    [error] = bare.received()
    assert error["code"] == "auth" and "cidd issue-cert n1" in error["message"] and bare.closed
    assert "n1" not in engine.nodes and factory.security.counts["security.agent_without_cert"] == 1
    admin = CertPeer(factory, None)
    admin.send({"type": "hello", "id": 1, "proto": 1, "role": "admin", "token": TOKENS["admin"]})
    assert admin.received()[0]["type"] == "reply"  # clients prove themselves with their token
    CertPeer(factory, "n1").send(agent_hello(node="n1"))
    engine.capture("9", ["n1"], "rocky-9-3", None, "admin", 3600)  # mints the installer boot token
    token, _expires = engine.netboot.tokens["n1"]
    installer = CertPeer(factory, None)
    installer.send(installer_hello(boot_token=token))
    assert [m["type"] for m in installer.received()][0] == "reply"  # one initramfs for all: the boot token


def test_failed_tls_handshakes_are_security_events_clean_closes_are_not(tls_world):
    from OpenSSL import SSL
    from twisted.python.failure import Failure

    _clock, _engine, factory = tls_world
    Peer(factory).proto.connectionLost(Failure(SSL.Error([("SSL routines", "", "wrong version number")])))
    Peer(factory).proto.connectionLost()  # a port probe: connected and closed before any byte
    assert factory.security.counts == {"security.tls_refused": 1}
