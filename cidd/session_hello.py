"""Who a peer is: the ``hello`` of a session, its token or certificate, a local peer's uid, an agent's node.

``HelloChecks`` is mixed into cidd.sessions.PeerProtocol (it uses the session's factory, ``send``, ``peer``
and timers); every check raises an AuthError or BadRequest that the session answers, after a rate-limited
security event, before anything is registered.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import structlog
from twisted.python.failure import Failure

from cidcommon import __version__, wire
from cidcommon.errors import AuthError, BadRequest, CidError
from cidcommon.paths import node_token, tokens_equal
from cidcommon.vocabulary import Mode
from cidd.agent_messages import install_report
from cidd.unix_peers import PeerIdentity, granted_role, socket_role
from cidd.user_directory import UserDatabaseUnavailable

log = structlog.get_logger(__name__)


class CertificateRefused(AuthError):
    """An agent's TLS client certificate does not allow its hello; ``kind`` names the security event."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class SessionSurface:
    """What a cidd session (cidd.sessions.PeerProtocol) offers the halves mixed into it: stubs for the type checker,
    overridden by the session."""

    @property
    def peer(self) -> str:
        """Return the peer's address as logs show it (the session's)."""
        raise NotImplementedError

    def send(self, message: dict[str, Any]) -> None:
        """Write one message to the peer (the session's)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the session (the session's)."""
        raise NotImplementedError


class HelloChecks(SessionSurface):
    """The hello and authentication half of a cidd session (see the module docstring)."""

    # What the session (cidd.sessions.PeerProtocol) provides to this half: declared here for the type checker.
    factory: Any
    transport: Any
    session_id: str
    peer_cert_node: str | None
    closed: bool
    role: str | None
    node: str | None
    user: str | None
    agent_mode: str | None
    local: PeerIdentity | None
    _held: bytes
    _identity_pending: bool
    _hello_timer: Any

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """Take bytes from the peer (the session's)."""
        raise NotImplementedError

    def _touch(self) -> None:
        """Note that the peer is alive (the session's)."""
        raise NotImplementedError

    def heartbeat_now(self) -> float:
        """Return the heartbeat interval to tell the peer, remembered as told (the session's)."""
        raise NotImplementedError

    def _identity_known(self, peer: PeerIdentity) -> None:
        """The local peer's name and groups are known: go on with what it sent meanwhile."""
        self.local = peer
        self._identity_pending = False
        held, self._held = self._held, b""
        if held and not self.closed:
            self.dataReceived(held)

    def _identity_failed(self, failure: Failure) -> None:
        """The user database did not tell who the local peer is: say so and close (nothing was done)."""
        self._identity_pending = False
        self._held = b""
        error = (failure.value if isinstance(failure.value, CidError)
                 else UserDatabaseUnavailable(failure.getErrorMessage()))
        log.warning("session.peer_lookup_failed", peer=self.peer, session=self.session_id, error=error.message)
        if not self.closed:
            self.send(wire.error(error.code, error.message))
            self.close()

    def _hello(self, message: wire.Message) -> None:
        proto = message.get("proto")
        if proto != wire.PROTOCOL_VERSION:
            raise AuthError(f"protocol version {proto!r} is not supported; this cidd speaks version "
                            f"{wire.PROTOCOL_VERSION}: upgrade the older side")
        role = message.get("role")
        token = message.get("token")
        expected = self.factory.tokens.get(role) if isinstance(role, str) else None
        resume = None
        if self.factory.unix:
            role = self._local_role(role)
        elif role == wire.AGENT_ROLE and token is None and ("boot_token" in message or "resume_token" in message):
            resume = self._installer_credentials(message)
        elif role == wire.AGENT_ROLE and expected is not None:
            self._check_agent_token(message, expected)
        elif expected is None or not isinstance(token, str) or not tokens_equal(token, expected):
            raise AuthError("authentication failed: wrong or missing token for role "
                            f"{role!r}; use the token file of that role from cidd's state directory")
        if role == wire.AGENT_ROLE:
            self._check_agent_cert(message, installer=resume is not None)
            self._agent_hello(message)
        self.role = role
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        extra = {"resume_token": resume} if resume else {}
        self.send(wire.reply(message.get("id"), proto=wire.PROTOCOL_VERSION, server=f"cidd {__version__}",
                             heartbeat=self.heartbeat_now(), session=self.session_id, **extra))
        if role == wire.AGENT_ROLE:
            self.factory.engine.agent_connected(self.node, message["boot_id"], message["mode"],
                                                message.get("image"), install_report(message))
        else:
            log.info("client.connected", peer=self.peer, role=role, session=self.session_id, user=self.user)

    def _check_agent_token(self, message: wire.Message, master: str) -> None:
        """Check an agent's token against its node's own token (HMAC of the node name under the master).

        Raises AuthError when the token is missing or belongs to another node (nothing is registered).
        """
        node, token = message.get("node"), message.get("token")
        if not isinstance(node, str) or not node:
            raise BadRequest("an agent hello needs 'node', the node's name")
        if not isinstance(token, str) or not tokens_equal(token, node_token(master, node)):
            raise AuthError(f"authentication failed: this is not node {node}'s agent token; each node uses its "
                            f"own token, made on the head node with 'cidd agent-token {node}'")

    def _peer_ids(self) -> tuple[int, int] | None:
        """Return the (uid, gid) of the local socket's peer (SO_PEERCRED), or None when unavailable."""
        try:
            handle = self.transport.getHandle()  # type: ignore[union-attr]
            _pid, uid, gid = struct.unpack("3i", handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                   struct.calcsize("3i")))
        except (AttributeError, OSError):
            return None
        return uid, gid

    def _local_role(self, requested: Any) -> str:
        """Return the role of a local socket peer from its uid/gid (no token). Raises AuthError."""
        peer = self.local
        role = socket_role(peer, self.factory.socket_roles, self.factory.own_uid) if peer else None
        if role is None or requested == wire.AGENT_ROLE:
            who = f"user {peer.user} (uid {peer.uid})" if peer else "a peer of unknown uid"
            raise AuthError(f"authentication failed: {who} has no role on cidd's local socket; ask the "
                            "administrators to add it to socket.roles in cidd.yaml, or use a token over TCP")
        self.user = peer.user if peer else None
        return granted_role(role, requested)

    def _installer_credentials(self, message: wire.Message) -> str:
        """Check an installer's boot or resume token (never the agent token); return its resume token.

        Raises AuthError (logged as a security event) when the token is wrong, used, expired, or not from an
        installer.
        """
        node = wire.get_str(message, "node")
        if message.get("mode") != "installer":
            raise AuthError("boot and resume tokens are for the installer only; an installed system "
                            "uses the agent token")
        boot, resume = message.get("boot_token"), message.get("resume_token")
        return self.factory.engine.netboot.accept_installer_token(
            node, boot if isinstance(boot, str) else None, resume if isinstance(resume, str) else None)

    def _check_agent_cert(self, message: wire.Message, *, installer: bool) -> None:
        """Refuse an agent whose verified certificate names another node, or that has none when one is required.

        Installer sessions (boot/resume token) need no certificate: the installer image is the same for every
        node. Raises AuthError, after a rate-limited security event.
        """
        node = message.get("node")
        if self.peer_cert_node is not None and node != self.peer_cert_node:
            raise CertificateRefused(f"this agent's certificate is for node {self.peer_cert_node!r}, but its hello "
                                     f"names {node!r}; an agent may only speak for its own node: check --node and "
                                     "--cert", kind="node_mismatch")
        if self.peer_cert_node is None and self.factory.client_certs == "required" and not installer:
            raise CertificateRefused("cidd requires a client certificate from agents (tls.client_certs: required); "
                                     f"issue one with 'cidd issue-cert {node}' and pass it to cidkid with --cert/--key",
                                     kind="agent_without_cert")

    def _agent_hello(self, message: wire.Message) -> None:
        node = wire.get_str(message, "node")
        wire.get_str(message, "boot_id")
        if message.get("mode") not in tuple(Mode):
            raise BadRequest("'mode' must be 'system' or 'installer'")
        image = message.get("image")
        if image is not None and not isinstance(image, str):
            raise BadRequest("'image' must be a string or null")
        install_report(message)  # a wrong 'install' field refuses the hello before anything is registered
        self.agent_mode = message["mode"]
        engine = self.factory.engine
        if not engine.register(node):
            raise AuthError(f"node {node!r} is not in cidd's inventory; add it to 'nodes' in cidd.yaml")
        old = self.factory.sessions.agents.get(node)
        self.node = node
        self.factory.sessions.agents[node] = self
        if old is not None:
            log.warning("agent.session_superseded", node=node, old=old.session_id, new=self.session_id)
            old.send(wire.error("superseded", "a newer session for this node took over"))
            old.node = None  # the old session no longer speaks for the node
            old.close()
            engine.agent_lost(node)
        log.info("agent.connected", node=node, mode=message["mode"], image=image, session=self.session_id,
                 peer=self.peer)
        self._touch()
