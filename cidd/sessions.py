"""TCP sessions of cidd (docs/protocol.md): framing, hello and tokens, agent messages, request timeouts.

One ``PeerProtocol`` per connection turns lines into calls on the engine (agents) or on the client API
(clients). ``Sessions`` keeps the live agent session of each node (the newest wins) and sends commands.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import structlog
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from cidcommon import __version__, wire
from cidcommon.errors import AuthError, BadRequest, CidError, ProtocolError
from cidcommon.paths import tokens_equal
from cidd.client_api import ClientAPI
from cidd.engine import Engine, SessionClosed
from cidd.tls import SecurityEvents

log = structlog.get_logger("cidd.sessions")

HELLO_TIMEOUT = 10.0
MAX_BAD_LINES = 10
_session_ids = itertools.count(1)


class CommandError(Exception):
    """An agent answered a command with an error, or did not answer in time, or is not connected."""


class Sessions:
    """The live agent session of every node; implements the engine's AgentLink."""

    def __init__(self) -> None:
        self.agents: dict[str, PeerProtocol] = {}

    def command(self, node: str, message: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Send ``message`` to ``node``'s agent; fire with the reply, or fail with CommandError."""
        session = self.agents.get(node)
        if session is None:
            return fail(CommandError(f"no agent session for {node}"))
        return session.request(message)


@implementer(IHandshakeListener)
class PeerProtocol(Protocol):
    """One TCP (or TLS) session with an agent or a client.

    ``peer_cert_node`` is the CN of the client certificate the peer presented and cidd verified against its CA
    (None without one): an agent hello naming another node is refused.
    """

    def __init__(self, factory: CiddFactory) -> None:
        self.factory = factory
        self.clock: IReactorTime = factory.clock
        self.buffer = wire.LineBuffer(factory.engine.config.max_line)
        self.role: str | None = None
        self.node: str | None = None
        self.session_id = f"s-{next(_session_ids)}"
        self.bad_lines = 0
        self.closed = False
        self.pending: dict[str, tuple[Deferred[dict[str, Any]], IDelayedCall]] = {}
        self._ids = itertools.count(1)
        self._hello_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self.cleanups: list[Any] = []
        self.tls_established = False
        self.peer_cert_node: str | None = None

    # --- connection ---

    @property
    def peer(self) -> str:
        address = self.transport.getPeer() if self.transport else None
        return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"

    def connectionMade(self) -> None:
        self._hello_timer = self.clock.callLater(HELLO_TIMEOUT, self._no_hello)

    def _no_hello(self) -> None:
        self._hello_timer = None
        log.warning("session.hello_timeout", peer=self.peer, session=self.session_id)
        self.send(wire.error("out_of_order", f"no hello within {HELLO_TIMEOUT:g}s"))
        self.close()

    def handshakeCompleted(self) -> None:
        """TLS is up: remember the verified client certificate's CN (Twisted calls this once per session)."""
        self.tls_established = True
        getter = getattr(self.transport, "getPeerCertificate", None)
        cert = getter() if getter is not None else None
        if cert is not None:
            names = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            self.peer_cert_node = str(names[0].value) if names else None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.factory.tls and not self.tls_established and reason.check(SSL.Error):
            # plain TCP on the TLS port, an untrusted client certificate, a client that does not trust us
            self.factory.security.warn("security.tls_refused", peer=self.peer, session=self.session_id,
                                       reason=reason.getErrorMessage()[:200])
        self.closed = True
        for timer in (self._hello_timer, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        lost_node = None
        if self.role == wire.AGENT_ROLE and self.node is not None:
            if self.factory.sessions.agents.get(self.node) is self:
                del self.factory.sessions.agents[self.node]
                lost_node = self.node
        pending, self.pending = self.pending, {}
        for deferred, timer in pending.values():
            if timer.active():
                timer.cancel()
            deferred.errback(SessionClosed("the agent session closed before answering"))
        for cleanup in self.cleanups:
            cleanup()
        if lost_node is not None:
            log.info("agent.disconnected", node=lost_node, session=self.session_id)
            self.factory.engine.agent_lost(lost_node)

    def send(self, message: dict[str, Any]) -> None:
        """Write one message, unless the session is closed."""
        if not self.closed and self.transport is not None:
            self.transport.write(wire.encode(message))

    def close(self) -> None:
        """Close the session after pending writes."""
        if not self.closed and self.transport is not None:
            self.transport.loseConnection()

    # --- input ---

    def dataReceived(self, data: bytes) -> None:
        try:
            lines = self.buffer.feed(data)
        except wire.LineTooLong as exc:
            self._reject(exc, close=True)
            return
        self._touch()
        for line in lines:
            if self.closed:
                return
            try:
                self.lineReceived(line)
            except Exception:  # nothing one peer sends may escape into Twisted (or take the daemon down)
                log.exception("session.internal_error", peer=self.peer, node=self.node)
                self.send(wire.error("internal", "cidd hit an internal error; see its log"))
                self.close()

    def lineReceived(self, line: bytes) -> None:
        try:
            message = wire.decode(line)
        except ProtocolError as exc:
            self._reject(exc)
            return
        request_id = message.get("id")
        try:
            self.dispatch(message)
        except CidError as exc:
            self.send(wire.error(exc.code, exc.message, request_id))
            if isinstance(exc, AuthError) or exc.code == "out_of_order":
                self.close()
        except Exception:  # a bug must not take the daemon down
            log.exception("session.internal_error", peer=self.peer, type=message.get("type"))
            self.send(wire.error("internal", "cidd hit an internal error; see its log", request_id))

    def _reject(self, exc: CidError, close: bool = False) -> None:
        self.bad_lines += 1
        log.warning("session.bad_line", peer=self.peer, node=self.node, code=exc.code, error=exc.message)
        self.send(wire.error(exc.code, exc.message))
        if close or self.bad_lines >= MAX_BAD_LINES:
            self.close()

    def dispatch(self, message: wire.Message) -> None:
        """Route one decoded message. Raises CidError subclasses that become error replies."""
        kind = message["type"]
        if kind in ("reply", "error") and "id" in message and str(message["id"]) in self.pending:
            self._answer(message)
            return
        if self.role is None:
            if kind != "hello":
                raise CidError("the first message must be 'hello'", code="out_of_order")
            self._hello(message)
            return
        if kind == "hello":
            raise CidError("'hello' was already accepted on this session", code="out_of_order")
        if self.role == wire.AGENT_ROLE:
            self._agent_message(message)
        else:
            self.factory.api.handle(self, message)

    # --- hello and authentication ---

    def _hello(self, message: wire.Message) -> None:
        proto = message.get("proto")
        if proto != wire.PROTOCOL_VERSION:
            raise AuthError(f"protocol version {proto!r} is not supported; this cidd speaks version "
                            f"{wire.PROTOCOL_VERSION}: upgrade the older side")
        role = message.get("role")
        token = message.get("token")
        expected = self.factory.tokens.get(role) if isinstance(role, str) else None
        resume = None
        if role == wire.AGENT_ROLE and token is None and ("boot_token" in message or "resume_token" in message):
            resume = self._installer_credentials(message)
        elif expected is None or not isinstance(token, str) or not tokens_equal(token, expected):
            log.warning("session.auth_failed", peer=self.peer, role=role, node=message.get("node"))
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
                             heartbeat=self.factory.engine.config.heartbeat, session=self.session_id, **extra))
        if role == wire.AGENT_ROLE:
            self.factory.engine.agent_connected(self.node, message["boot_id"], message["mode"],
                                                message.get("image"))
        else:
            log.info("client.connected", peer=self.peer, role=role, session=self.session_id)

    def _installer_credentials(self, message: wire.Message) -> str:
        """Check an installer's boot or resume token (never the agent token); return its resume token.

        Raises AuthError (logged as a security event) when the token is wrong, used, expired, or not from an
        installer.
        """
        node = wire.get_str(message, "node")
        try:
            if message.get("mode") != "installer":
                raise AuthError("boot and resume tokens are for the installer only; an installed system "
                                "uses the agent token")
            boot, resume = message.get("boot_token"), message.get("resume_token")
            return self.factory.engine.netboot.accept_installer_token(
                node, boot if isinstance(boot, str) else None, resume if isinstance(resume, str) else None)
        except AuthError as exc:
            log.warning("session.auth_failed", peer=self.peer, role="agent", node=node, reason=exc.message)
            raise

    def _check_agent_cert(self, message: wire.Message, *, installer: bool) -> None:
        """Refuse an agent whose verified certificate names another node, or that has none when one is required.

        Installer sessions (boot/resume token) need no certificate: the installer image is the same for every
        node. Raises AuthError, after a rate-limited security event.
        """
        node = message.get("node")
        if self.peer_cert_node is not None and node != self.peer_cert_node:
            self.factory.security.warn("security.node_mismatch", peer=self.peer, cert_node=self.peer_cert_node,
                                       node=node, session=self.session_id)
            raise AuthError(f"this agent's certificate is for node {self.peer_cert_node!r}, but its hello "
                            f"names {node!r}; an agent may only speak for its own node: check --node and --cert")
        if self.peer_cert_node is None and self.factory.client_certs == "required" and not installer:
            self.factory.security.warn("security.agent_without_cert", peer=self.peer, node=node,
                                       session=self.session_id)
            raise AuthError("cidd requires a client certificate from agents (tls.client_certs: required); "
                            f"issue one with 'cidd issue-cert {node}' and pass it to cidkid with --cert/--key")

    def _agent_hello(self, message: wire.Message) -> None:
        node = wire.get_str(message, "node")
        wire.get_str(message, "boot_id")
        if message.get("mode") not in ("system", "installer"):
            raise BadRequest("'mode' must be 'system' or 'installer'")
        image = message.get("image")
        if image is not None and not isinstance(image, str):
            raise BadRequest("'image' must be a string or null")
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

    # --- agent messages and liveness ---

    def _touch(self) -> None:
        """Push back the idle deadline of an agent session (3 x heartbeat without any line)."""
        if self.role != wire.AGENT_ROLE and self.node is None:
            return
        limit = 3 * self.factory.engine.config.heartbeat
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(limit)
        else:
            self._idle_timer = self.clock.callLater(limit, self._idle)

    def _idle(self) -> None:
        log.warning("agent.silent", node=self.node, session=self.session_id)
        if self.transport is not None:
            self.transport.abortConnection()

    def _agent_message(self, message: wire.Message) -> None:
        engine = self.factory.engine
        kind = message["type"]
        node = self.node
        if node is None:
            raise CidError("this session was superseded", code="out_of_order")
        if kind == "heartbeat":
            figures = {k: v for k, v in message.items() if k not in ("type", "id") and isinstance(v, int | float)}
            engine.heartbeat(node, figures)
            self.send(wire.reply(message.get("id")))
        elif kind == "progress":
            engine.progress(node, message)
        elif kind == "installed":
            image = wire.get_str(message, "image")
            engine.installed(node, image, bool(message.get("ok")), message.get("reason"),
                             bool(message.get("retry")))
        else:
            raise CidError(f"unknown message type {kind!r} for an agent", code="unknown_type")

    # --- requests to the peer ---

    def request(self, message: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Send a request with a fresh id; fire with the reply, fail with CommandError on error or timeout."""
        request_id = f"c-{next(self._ids)}"
        deferred: Deferred[dict[str, Any]] = Deferred()
        timeout = self.factory.engine.config.request_timeout
        timer = self.clock.callLater(timeout, self._timed_out, request_id, message["type"])
        self.pending[request_id] = (deferred, timer)
        self.send({**message, "id": request_id})
        return deferred

    def _timed_out(self, request_id: str, kind: str) -> None:
        entry = self.pending.pop(request_id, None)
        if entry is not None:
            log.warning("agent.request_timeout", node=self.node, type=kind, session=self.session_id)
            entry[0].errback(TimeoutError(f"no answer to '{kind}' within the request timeout"))
            if self.transport is not None:
                self.transport.abortConnection()

    def _answer(self, message: wire.Message) -> None:
        deferred, timer = self.pending.pop(str(message["id"]))
        if timer.active():
            timer.cancel()
        if message["type"] == "reply":
            deferred.callback(message)
        else:
            deferred.errback(CommandError(str(message.get("message") or message.get("code"))))


class CiddFactory(Factory):
    """Builds a PeerProtocol per connection; holds what every session shares."""

    def __init__(self, engine: Engine, sessions: Sessions, tokens: Mapping[str, str], clock: IReactorTime, *,
                 tls: bool = False, client_certs: str = "none") -> None:
        self.engine = engine
        self.sessions = sessions
        self.tokens = dict(tokens)
        self.clock = clock
        self.api = ClientAPI(engine, clock)
        self.tls = tls  # the port speaks TLS: a session lost before its handshake is a refused peer
        self.client_certs = client_certs  # none | optional | required (cidd.config.TlsConfig)
        self.security = SecurityEvents(clock)

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        return PeerProtocol(self)
