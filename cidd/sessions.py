"""TCP sessions of cidd (docs/protocol.md): framing, hello and tokens, agent messages, request timeouts.

One ``PeerProtocol`` per connection turns lines into calls on the engine (agents) or on the client API
(clients). ``Sessions`` keeps the live agent session of each node (the newest wins) and sends commands.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

import structlog
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from cidcommon import wire
from cidcommon.errors import AuthError, CidError, Forbidden, ProtocolError
from cidcommon.requests import Pending
from cidcommon.twisted_requests import DeferredRequests
from cidcommon.wire import HELLO_TIMEOUT
from cidd.agent_messages import installed_event, with_agent_token
from cidd.client_api import ClientAPI
from cidd.core.heartbeats import silence_limit
from cidd.core.rights import RightsRefused
from cidd.engine import CommandTimeout, Engine, SessionClosed
from cidd.security_events import SecurityEvents, peer_host
from cidd.session_hello import CertificateRefused, HelloChecks
from cidd.session_liveness import HANDSHAKE_TIMEOUT, SessionLiveness
from cidd.unix_peers import PeerIdentity
from cidd.user_directory import UserDirectory, thread_runner

log = structlog.get_logger(__name__)

__all__ = ["HANDSHAKE_TIMEOUT", "HELLO_TIMEOUT", "CiddFactory", "CommandError", "PeerProtocol", "Sessions"]

MAX_BAD_LINES = 10
_session_ids = itertools.count(1)


class CommandError(CidError):
    """An agent answered a command with an error, or did not answer in time, or is not connected."""

    code = "command_failed"


class Sessions:
    """The live agent session of every node; implements the engine's AgentLink."""

    def __init__(self) -> None:
        self.agents: dict[str, PeerProtocol] = {}
        self.agent_master: str | None = None  # set by CiddFactory: install commands carry the node's token

    def command(self, node: str, message: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Send ``message`` to ``node``'s agent; fire with the reply, or fail with CommandError.

        An ``install`` goes only to a session whose hello said installer mode (authenticated by a boot token,
        or by the node's own token or certificate) and carries the node's own agent token
        (``agent_messages.with_agent_token``), which the installer writes into the installed system.
        """
        session = self.agents.get(node)
        if session is None:
            return fail(CommandError(f"no agent session for {node}"))
        if message.get("type") == "install":
            if session.agent_mode != "installer":
                return fail(CommandError(f"{node}'s agent runs its installed system, not the installer"))
            message = with_agent_token(message, self.agent_master, node)
        return session.request(message)


@implementer(IHandshakeListener)
class PeerProtocol(SessionLiveness, HelloChecks, Protocol):
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
        self.pending = DeferredRequests(self.clock, self._request_timed_out, prefix="c-")  # cidd's requests
        self._hello_timer: IDelayedCall | None = None  # cidd.session_liveness
        self._idle_timer: IDelayedCall | None = None
        self.cleanups: list[Any] = []
        self.local: PeerIdentity | None = None  # the uid/gid of a peer on the local Unix socket
        self._identity_pending = False  # its user database lookup runs: input is held until it ends
        self._held = b""
        self.agent_mode: str | None = None  # an agent's hello: "system" or "installer"
        self.user: str | None = None  # a local peer's user name (the job user of its captures by default)
        self.tls_established = False
        self.peer_cert_node: str | None = None
        self.heartbeat: float | None = None  # the interval this agent was last told (cidd/core/heartbeats.py)
        base = factory.engine.config.heartbeat
        self.silence_limit = silence_limit(base, base)  # grows with the intervals told (cidd/core/heartbeats.py)

    # --- connection ---

    @property
    def peer(self) -> str:
        if self.factory.unix:
            return f"unix:uid={self.local.uid}" if self.local else "unix:?"
        address = self.transport.getPeer() if self.transport else None
        return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"

    def refused(self, exc: CidError, message: wire.Message) -> None:
        """Log (rate-limited) and count the refusal of ``message`` as a security event (never its token)."""
        if isinstance(exc, CertificateRefused):
            kind = exc.kind
        elif isinstance(exc, RightsRefused):
            kind = "rights_refused"
        elif isinstance(exc, Forbidden):
            kind = "forbidden"
        else:
            kind = "peer_refused" if self.factory.unix else "auth_failed"
        hello = self.role is None
        node = message.get("node") if hello else self.node
        self.factory.security.refused(kind, peer_host(self.peer), role=message.get("role") if hello else self.role,
                                      node=node if isinstance(node, str) else None, type=message.get("type"),
                                      session=self.session_id, reason=exc.message,
                                      **({"cert_node": self.peer_cert_node} if self.peer_cert_node else {}))

    def connectionMade(self) -> None:
        self.start_hello_timer()
        if self.factory.unix:
            ids = self._peer_ids()
            if ids is not None:
                self._identity_pending = True
                self.factory.directory.peer(*ids).addCallbacks(self._identity_known, self._identity_failed)

    def handshakeCompleted(self) -> None:
        """TLS is up: remember the verified client certificate's CN (Twisted calls this once per session), and
        give the peer HELLO_TIMEOUT from now for its hello."""
        self.tls_established = True
        self.handshake_done()
        getter = getattr(self.transport, "getPeerCertificate", None)
        cert = getter() if getter is not None else None
        if cert is not None:
            names = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            self.peer_cert_node = str(names[0].value) if names else None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.factory.tls and not self.tls_established and reason.check(SSL.Error):
            # plain TCP on the TLS port, an untrusted client certificate, a client that does not trust us
            self.factory.security.refused("tls_refused", peer_host(self.peer), session=self.session_id,
                                          reason=reason.getErrorMessage()[:200])
        self.closed = True
        self.stop_timers()
        lost_node = None
        if self.role == wire.AGENT_ROLE and self.node is not None:
            if self.factory.sessions.agents.get(self.node) is self:
                del self.factory.sessions.agents[self.node]
                lost_node = self.node
        self.pending.fail_all(lambda _pending: SessionClosed("the agent session closed before answering"))
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
        if self._identity_pending:
            self._held += data
            if len(self._held) > self.buffer.max_line:  # its hello and first request fit easily
                self._reject(wire.LineTooLong(f"more than {self.buffer.max_line} bytes sent before cidd knew who "
                                              "this local peer is; send the hello and wait for its reply"),
                             close=True)
            return
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
        try:
            self.dispatch(message)
        except CidError as exc:
            self.request_refused(exc, message)
        except Exception:  # a bug must not take the daemon down
            log.exception("session.internal_error", peer=self.peer, type=message.get("type"))
            self.send(wire.error("internal", "cidd hit an internal error; see its log", message.get("id")))

    def request_refused(self, exc: CidError, message: wire.Message) -> None:
        """Answer ``message`` with the error ``exc`` (a security event when it is a refusal)."""
        if isinstance(exc, AuthError | Forbidden):
            self.refused(exc, message)
        self.send(wire.error(exc.code, exc.message, message.get("id")))
        if isinstance(exc, AuthError) or exc.code == "out_of_order":
            self.close()

    def request_failed(self, failure: Failure, message: wire.Message) -> None:
        """Errback of a request answered later: its CidError becomes the error reply; anything else is a bug."""
        if isinstance(failure.value, CidError):
            self.request_refused(failure.value, message)
            return
        log.error("session.internal_error", peer=self.peer, type=message.get("type"),
                  error=failure.getTraceback())
        self.send(wire.error("internal", "cidd hit an internal error; see its log", message.get("id")))

    def _reject(self, exc: CidError, close: bool = False) -> None:
        self.bad_lines += 1
        log.warning("session.bad_line", peer=self.peer, node=self.node, code=exc.code, error=exc.message)
        self.send(wire.error(exc.code, exc.message))
        if close or self.bad_lines >= MAX_BAD_LINES:
            self.close()

    def dispatch(self, message: wire.Message) -> None:
        """Route one decoded message. Raises CidError subclasses that become error replies."""
        kind = message["type"]
        if kind in ("reply", "error") and self.pending.waits_for(message.get("id")):
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

    # --- agent messages and liveness ---

    def _agent_message(self, message: wire.Message) -> None:
        engine = self.factory.engine
        kind = message["type"]
        node = self.node
        if node is None:
            raise CidError("this session was superseded", code="out_of_order")
        if kind == "heartbeat":
            figures = {k: v for k, v in message.items() if k not in ("type", "id") and isinstance(v, int | float)}
            engine.heartbeat(node, figures)
            self.send(self._heartbeat_reply(message))
        elif kind == "progress":
            engine.progress(node, message)
        elif kind == "installed":
            engine.installed(node, installed_event(message))
        else:
            raise CidError(f"unknown message type {kind!r} for an agent", code="unknown_type")

    # --- requests to the peer ---

    def request(self, message: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Send a request with a fresh id; fire with the reply, fail with CommandError on error or timeout."""
        request_id, deferred = self.pending.start(message["type"], self.factory.engine.config.request_timeout)
        self.send({**message, "id": request_id})
        return deferred

    def _request_timed_out(self, pending: Pending[Any]) -> BaseException:
        """A request went unanswered: the session is half-open, abort it; return the request's error."""
        log.warning("agent.request_timeout", node=self.node, type=pending.kind, session=self.session_id)
        if self.transport is not None:
            self.transport.abortConnection()
        return CommandTimeout(f"no answer to '{pending.kind}' within the request timeout")

    def _answer(self, message: wire.Message) -> None:
        if message["type"] == "reply":
            self.pending.answer(message["id"], message)
        else:
            self.pending.fail(message["id"], CommandError(str(message.get("message") or message.get("code"))))


class CiddFactory(Factory):
    """Builds a PeerProtocol per connection; holds what every session shares."""

    def __init__(self, engine: Engine, sessions: Sessions, tokens: Mapping[str, str], clock: IReactorTime,
                 security: SecurityEvents | None = None, *, unix: bool = False,
                 directory: UserDirectory | None = None, tls: bool = False, client_certs: str = "none") -> None:
        self.engine = engine
        self.sessions = sessions
        self.tokens = dict(tokens)
        self.clock = clock
        sessions.agent_master = self.tokens.get(wire.AGENT_ROLE)
        self.security = security or SecurityEvents(clock.seconds)
        self.unix = unix  # the local Unix socket: roles from SO_PEERCRED, no tokens
        # users and groups are looked up in a thread and cached (cidd/user_directory.py): never on the reactor
        self.directory = directory or UserDirectory(clock, thread_runner(clock))  # type: ignore[arg-type]
        self.socket_roles = engine.config.socket.roles
        self.own_uid = os.geteuid()
        self.api = ClientAPI(engine, clock, self.directory)
        self.tls = tls  # the port speaks TLS: a session lost before its handshake is a refused peer
        self.client_certs = client_certs  # none | optional | required (cidd.config.TlsConfig)

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        return PeerProtocol(self)
