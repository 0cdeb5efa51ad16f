"""Keep one agent connected to cidd: a ClientService with a hello gate and jittered exponential backoff.

``AgentService`` reconnects forever. A connection only counts once cidd has answered ``hello``
(``prepareConnection``); a refused hello (wrong token) and a ``superseded`` session wait the longest delay before
trying again, and say so in the log each time, so that an operator sees a misconfigured node.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from twisted.application.internet import ClientService
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from cidcommon.errors import AuthError
from cidcommon.hostport import parse_hostport
from cidcommon.paths import check_private
from cidcommon.tlsfiles import TlsError
from cidcommon.wire import DEFAULT_PORT, Message
from cidkid.installs import InstallRunner
from cidkid.platform import Platform
from cidkid.protocol import REQUEST_TIMEOUT, AgentProtocol, InstallerCredentials

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT = 30.0


def parse_server(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Return (host, port) of cidd's address (``cidcommon.hostport``). Raises ValueError with a sentence."""
    return parse_hostport(text, default_port)


def client_endpoint(reactor: Any, host: str, port: int, timeout: float = CONNECT_TIMEOUT,
                    tls: IOpenSSLClientConnectionCreator | None = None) -> IStreamClientEndpoint:
    """Return a client endpoint for ``host:port`` (IP literals are used as is, names are resolved), over TLS
    with ``tls`` (see ``tls_options``), else plain TCP."""
    endpoint: IStreamClientEndpoint
    if isIPAddress(host):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    return endpoint if tls is None else wrapClientTLS(tls, endpoint)


def tls_options(host: str, ca: Path, cert: Path | None = None, key: Path | None = None
                ) -> IOpenSSLClientConnectionCreator:
    """Return TLS client options: cidd's certificate must be signed by ``ca`` and name ``host`` (a host name
    or an IP address); ``cert``/``key`` are this agent's certificate for mutual TLS (CN = node name).

    Raises TlsError naming the file when one is missing or unusable, TokenFileError when the key is readable
    by group or others.
    """
    from twisted.internet import ssl

    def read(path: Path, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise TlsError(f"cannot read {what} {path}: {exc.strerror}; copy it from the head node "
                           "(cidd's <state dir>/tls/ca.pem, or 'cidd issue-cert NODE' for an agent certificate) "
                           "or pass --ca / --cert / --key") from None

    try:
        trust = ssl.Certificate.loadPEM(read(ca, "CA file"))
    except TlsError:
        raise
    except Exception as exc:  # pyOpenSSL's own error types
        raise TlsError(f"CA file {ca} does not hold a PEM certificate ({exc}); use cidd's <state dir>/tls/ca.pem") \
            from None
    client = None
    if cert is not None:
        key = key or cert
        check_private(Path(key))
        try:
            client = ssl.PrivateCertificate.loadPEM(read(cert, "agent certificate") + b"\n" + read(key, "agent key"))
        except TlsError:
            raise
        except Exception as exc:
            raise TlsError(f"cannot use agent certificate {cert} with key {key}: {exc}") from None
    return ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)


class Backoff:
    """Reconnection delays: ``min(max_delay, initial * factor**attempt) * uniform(0.5, 1.5)``.

    The jitter is multiplicative so that thousands of nodes that lost cidd at the same moment spread their
    returns over the whole interval. ``hold_off(reason)`` makes the next delay the longest one.
    """

    def __init__(self, initial: float = 1.0, factor: float = 1.7, max_delay: float = 60.0,
                 rng: random.Random | None = None) -> None:
        self.initial = initial
        self.factor = factor
        self.max_delay = max_delay
        self._rng = rng or random.Random()
        self._held: str | None = None
        self.last_reason: str | None = None

    def base(self, attempt: int) -> float:
        """Return the delay before jitter for the 0-based ``attempt``."""
        try:
            return min(self.max_delay, self.initial * self.factor ** min(attempt, 1000))
        except OverflowError:
            return self.max_delay

    def delay(self, attempt: int) -> float:
        """Return the jittered delay for the 0-based ``attempt``."""
        return self.base(attempt) * self._rng.uniform(0.5, 1.5)

    def hold_off(self, reason: str) -> None:
        """Make the next delay the longest one (``reason`` is kept in ``last_reason`` for the log)."""
        self._held = reason

    def __call__(self, failed_attempts: int) -> float:
        """Return the delay after ``failed_attempts`` (>= 1, as ClientService counts) failures in a row."""
        self.last_reason, self._held = self._held, None
        if self.last_reason is not None:
            return self.max_delay * self._rng.uniform(0.5, 1.5)
        return self.delay(max(0, failed_attempts - 1))


@implementer(IProtocol)
class _Gate:
    """Hides a session's end from ClientService until cidd has answered ``hello``.

    ClientService only expects a connection-lost notification for connections it accepted (those whose
    ``prepareConnection`` succeeded); a session refused during ``hello`` is closed quietly instead.
    """

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self._agent: AgentProtocol = proxy.agent_protocol

    def makeConnection(self, transport: ITransport) -> None:
        self.proxy.makeConnection(transport)

    def connectionMade(self) -> None:
        """Nothing: ``makeConnection`` already told the wrapped protocol."""

    def dataReceived(self, data: bytes) -> None:
        self.proxy.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._agent.established:
            self.proxy.connectionLost(reason)
        else:
            self._agent.connectionLost(reason)


@implementer(IProtocolFactory)
class _GateFactory:
    """Wraps the protocols ClientService's factory builds in ``_Gate``."""

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory

    def buildProtocol(self, addr: Any) -> _Gate | None:
        proxy = self._factory.buildProtocol(addr)
        return None if proxy is None else _Gate(proxy)

    def doStart(self) -> None:
        self._factory.doStart()

    def doStop(self) -> None:
        self._factory.doStop()


@implementer(IStreamClientEndpoint)
class GatedEndpoint:
    """An endpoint that connects through ``endpoint`` with ``_Gate`` in front, logging failed attempts."""

    def __init__(self, endpoint: IStreamClientEndpoint, *, node: str = "", server: str = "") -> None:
        self._endpoint = endpoint
        self._node = node
        self._server = server

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        """Connect; return a Deferred firing with the protocol ClientService's factory built."""
        d = self._endpoint.connect(_GateFactory(factory))

        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError):
                log.info("agent.connect_failed", node=self._node, server=self._server,
                         reason=failure.getErrorMessage())
            return failure

        return d.addCallbacks(lambda gate: gate.proxy, failed)


class AgentFactory(Factory):
    """Builds the AgentProtocol of each new session; the InstallRunner is shared across sessions."""

    noisy = False

    def __init__(self, platform: Platform, token: str | InstallerCredentials, clock: IReactorTime, *,
                 installs: InstallRunner,
                 request_timeout: float = REQUEST_TIMEOUT,
                 on_superseded: Callable[[], None] | None = None) -> None:
        self.platform = platform
        self.token = token
        self.clock = clock
        self.installs = installs
        self.request_timeout = request_timeout
        self.on_superseded = on_superseded

    def buildProtocol(self, addr: Any) -> AgentProtocol:
        """Return a new AgentProtocol for one session."""
        proto = AgentProtocol(self.platform, self.token, self.clock, request_timeout=self.request_timeout,
                              installs=self.installs, on_superseded=self.on_superseded)
        proto.factory = self
        return proto


class AgentService(ClientService):
    """Keeps ``platform``'s agent connected to cidd through ``endpoint``, reconnecting with ``Backoff``.

    ``on_ready(protocol, hello_reply)`` is called each time a session started. ``protocol`` is the current
    session's AgentProtocol once one started (it may have ended since).
    """

    def __init__(self, platform: Platform, endpoint: IStreamClientEndpoint, token: str | InstallerCredentials,
                 clock: IReactorTime, *,
                 node: str | None = None, server: str = "", request_timeout: float = REQUEST_TIMEOUT,
                 backoff: Backoff | None = None,
                 on_ready: Callable[[AgentProtocol, Message], None] | None = None) -> None:
        self.node = node or platform.identity().node
        self.server = server
        self.backoff = backoff or Backoff()
        self.on_ready = on_ready
        self.protocol: AgentProtocol | None = None
        self.agent_factory = AgentFactory(
            platform, token, clock, installs=InstallRunner(platform, clock, node=self.node),
            request_timeout=request_timeout, on_superseded=lambda: self.backoff.hold_off("superseded"))
        super().__init__(GatedEndpoint(endpoint, node=self.node, server=server), self.agent_factory,
                         retryPolicy=self._retry, clock=clock, prepareConnection=self._prepare)

    def _prepare(self, proxy: Any) -> Deferred[Message]:
        """Return a Deferred firing when cidd answered ``hello``; an auth refusal holds the next retry off."""
        agent: AgentProtocol = proxy.agent_protocol

        def ready(answer: Message) -> Message:
            self.protocol = agent
            if self.on_ready is not None:
                try:
                    self.on_ready(agent, answer)
                except Exception:
                    log.exception("agent.on_ready_failed", node=self.node)
            return answer

        def refused(failure: Failure) -> Failure:
            if failure.check(AuthError):
                self.backoff.hold_off("auth")
            elif "SSL routines" in failure.getErrorMessage():
                self.backoff.hold_off("tls")
                log.error("agent.tls_failed", node=self.node, server=self.server, reason=failure.getErrorMessage(),
                          hint="cidd's certificate must be signed by the CA file given with --ca ($CID_CA_FILE) and "
                          "name the --server host; with client_certs: required the agent needs --cert/--key")
            return failure

        return agent.when_ready().addCallbacks(ready, refused)

    def _retry(self, failed_attempts: int) -> float:
        """Return (and log) the delay before the next connection attempt."""
        delay = self.backoff(failed_attempts)
        reason = self.backoff.last_reason
        fields = {"node": self.node, "server": self.server, "attempt": failed_attempts, "delay": round(delay, 2)}
        if reason == "auth":
            log.error("agent.retry_after_auth_failure", **fields,
                      hint="check that this node's token file holds 'cidd agent-token NODE' from the head node")
        elif reason is not None:
            log.warning("agent.retry_scheduled", reason=reason, **fields)
        else:
            log.info("agent.retry_scheduled", **fields)
        return delay
