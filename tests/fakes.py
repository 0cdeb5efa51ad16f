"""Test doubles shared by the engine and session tests: a link whose agents never answer, and client/agent
peers on a StringTransport."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from cidcommon.paths import node_token
from cidd.sessions import CiddFactory, PeerProtocol

TOKENS = {"agent": "agent-secret", "admin": "admin-secret", "scheduler": "sched-secret", "reader": "read-secret"}


class SilentLink:
    """An AgentLink that records the commands sent to agents; they never answer (the test says what happens)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def command(self, node: str, message: dict) -> Deferred:
        self.sent.append((node, message))
        return Deferred()

    def reboots(self) -> list[str]:
        """Return the nodes sent a reboot, in order."""
        return [node for node, message in self.sent if message["type"] == "reboot"]


class Peer:
    """One PeerProtocol on a StringTransport, with helpers to send lines and read what cidd wrote."""

    def __init__(self, factory: CiddFactory) -> None:
        self.proto: PeerProtocol = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        self.proto.makeConnection(self.transport)

    def send(self, message: dict | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.proto.dataReceived(data)

    def received(self) -> list[dict]:
        lines = self.transport.value().decode().splitlines()
        self.transport.clear()
        return [json.loads(line) for line in lines]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected


def agent_hello(node="n1", mode="system", image="debian-12-1", boot="b1", token=None) -> dict:
    token = node_token("agent-secret", node) if token is None else token  # each node has its own token
    return {"type": "hello", "id": 1, "proto": 1, "role": "agent", "token": token, "node": node, "mode": mode,
            "image": image, "boot_id": boot, "extra_key_is_ignored": True}


def client(factory, role="admin") -> Peer:
    peer = Peer(factory)
    peer.send({"type": "hello", "id": 1, "proto": 1, "role": role, "token": TOKENS[role]})
    assert peer.received()[0]["type"] == "reply"
    return peer
