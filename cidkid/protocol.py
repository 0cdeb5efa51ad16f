"""The agent side of one cidd session (docs/protocol.md): hello, heartbeats, and cidd's commands.

``AgentProtocol`` turns bytes into actions on a ``Platform`` and an ``InstallRunner``. It never touches the
global reactor: time comes from the injected clock, so tests drive it with ``twisted.internet.task.Clock`` and
``StringTransport``. A session that stops answering (a request unanswered within ``request_timeout``, or nothing
at all received for 3 x heartbeat) is aborted, so that the service reconnects.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from typing import Any

import structlog
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from cidcommon.errors import AuthError, BadRequest, CidError, ProtocolError
from cidcommon.requests import Pending
from cidcommon.twisted_requests import DeferredRequests
from cidcommon.wire import (
    AGENT_ROLE,
    MAX_LINE,
    PROTOCOL_VERSION,
    LineBuffer,
    LineTooLong,
    Message,
    decode,
    encode,
    error,
    get_number,
    get_str,
    reply,
)
from cidinstall.types import PIECE_DIGEST, InstallRequest, MulticastSpec
from cidkid import AGENT_VERSION
from cidkid.installs import InstallRunner
from cidkid.platform import BOOT_TARGETS, Identity, Platform
from cidkid.reboots import RebootSpec, parse_spec

log = structlog.get_logger(__name__)

REQUEST_TIMEOUT = 30.0
#: Seconds cidd has to answer ``hello`` once the connection is up. Longer than other requests: after a restart of
#: cidd, or when thousands of nodes reboot at once, cidd is up but busy with thousands of TLS handshakes; giving
#: up sooner only costs cidd this agent's handshake again, later (docs/performance.md).
HELLO_ANSWER_TIMEOUT = 120.0
DEFAULT_HEARTBEAT = 10.0
#: The session is dropped when nothing was received for this many heartbeat intervals.
SILENCE_FACTOR = 3


class RequestTimeout(CidError):
    """cidd did not answer a request in time; the session is treated as gone."""

    code = "timeout"


class SessionLost(CidError):
    """The session closed before the answer came."""

    code = "closed"


_SERVER_ERRORS: dict[str, type[CidError]] = {"auth": AuthError, "bad_request": BadRequest,
                                             "bad_message": ProtocolError}


def server_error(message: Message) -> CidError:
    """Return the exception matching a received ``error`` message (AuthError for ``auth``, ...)."""
    raw_code, raw_text = message.get("code"), message.get("message")
    code = raw_code if isinstance(raw_code, str) else "internal"
    text = raw_text if isinstance(raw_text, str) else f"cidd answered {code}"
    return _SERVER_ERRORS.get(code, CidError)(text, code=code)


def parse_install(message: Message) -> InstallRequest:
    """Return the InstallRequest held by an ``install`` message; raise BadRequest naming a wrong field.

    ``resume_for`` (seconds a dropped download is resumed) is optional: absent, the installer's default applies.
    ``distribution`` (optional) names cidd's multicast session (``_multicast``).
    """
    size = get_number(message, "size")
    resume_for = get_number(message, "resume_for")
    if resume_for is not None and not math.isfinite(resume_for):
        raise BadRequest("'resume_for' must be a finite number of seconds")
    return InstallRequest(
        multicast=_multicast(message),
        image=str(get_str(message, "image")),
        url=str(get_str(message, "url")),
        sha256=get_str(message, "sha256", required=False),
        size=int(size) if size is not None else None,
        format=str(get_str(message, "format", required=False, default="tar.zst")),
        agent_token=get_str(message, "agent_token", required=False),
        resume_for=resume_for,
    )


def _multicast(message: Message) -> MulticastSpec | None:
    """Return the MulticastSpec of an ``install`` message's ``distribution`` (docs/distribution.md), or None when
    it has none or names a method this installer does not know (the install then uses HTTP).

    Raises BadRequest naming a wrong field.
    """
    field = message.get("distribution")
    if field is None:
        return None
    if not isinstance(field, dict):
        raise BadRequest("'distribution' must be an object")
    if field.get("method") != "multicast":
        log.warning("agent.distribution_unknown", method=field.get("method"), fallback="http")
        return None
    numbers = {}
    for key in ("port", "size", "piece_size"):
        value = field.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "size" else 1):
            raise BadRequest(f"'distribution.{key}' must be a whole number")
        numbers[key] = value
    try:
        pieces = base64.b64decode(str(field.get("pieces", "")), validate=True)
    except ValueError:
        raise BadRequest("'distribution.pieces' must be base64") from None
    if len(pieces) != PIECE_DIGEST * -(-numbers["size"] // numbers["piece_size"]):
        raise BadRequest("'distribution.pieces' does not match 'size' and 'piece_size'")
    timing = {}
    for key in ("start_timeout", "stall"):
        value = get_number(field, key)
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise BadRequest(f"'distribution.{key}' must be a number of seconds > 0")
        if value is not None:
            timing[key] = float(value)
    session = field.get("session")
    return MulticastSpec(port=numbers["port"], size=numbers["size"], piece_size=numbers["piece_size"],
                         pieces=pieces, node=get_str(field, "node", required=False),
                         session=session if isinstance(session, int) and not isinstance(session, bool) else None,
                         **timing)


def _salvage_id(line: bytes) -> Any:
    """Return the ``id`` of a line that failed to decode when one can still be read, else None."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(message, dict) and isinstance(message.get("id"), int | str) \
            and not isinstance(message.get("id"), bool):
        return message["id"]
    return None


class InstallerCredentials:
    """An installer's credentials: the single-use boot token from its kernel command line, then the resume
    token cidd hands back in its hello reply (used for every reconnect of the same installer boot)."""

    def __init__(self, boot_token: str) -> None:
        self.boot_token = boot_token
        self.resume_token: str | None = None

    def hello_fields(self) -> dict[str, str]:
        """Return the credential field of the next ``hello``."""
        return {"resume_token": self.resume_token} if self.resume_token else {"boot_token": self.boot_token}

    def accepted(self, answer: Message) -> None:
        """Keep the resume token of cidd's hello reply."""
        token = answer.get("resume_token")
        if isinstance(token, str) and token:
            self.resume_token = token


class AgentProtocol(Protocol):
    """One agent session: sends ``hello``, then heartbeats; answers ``reboot`` and ``install``.

    ``when_ready()`` gives a Deferred firing with cidd's hello reply (or failing with AuthError, RequestTimeout,
    SessionLost, ...). ``on_superseded`` is called when cidd says another session took this node over.
    """

    def __init__(self, platform: Platform, token: str | InstallerCredentials, clock: IReactorTime, *,
                 request_timeout: float = REQUEST_TIMEOUT, max_line: int = MAX_LINE,
                 installs: InstallRunner | None = None, agent: str = AGENT_VERSION,
                 on_superseded: Callable[[], None] | None = None,
                 hello_timeout: float = HELLO_ANSWER_TIMEOUT) -> None:
        self._platform = platform
        self._token = token
        self._clock = clock
        self.request_timeout = request_timeout
        self.hello_timeout = max(hello_timeout, request_timeout)
        self._buffer = LineBuffer(max_line)
        self._installs = installs
        self._agent = agent
        self._on_superseded = on_superseded
        self._requests = DeferredRequests(clock, self._request_timed_out)  # the agent's requests (hello, beats)
        self._hello_id: Any = None
        self._waiters: list[Deferred[Message]] = []
        self._outcome: Message | Failure | None = None
        self._closing = False
        self._heartbeat_call: IDelayedCall | None = None
        self._last_received = 0.0
        self._log = log
        self.identity: Identity | None = None
        self.heartbeat: float | None = None
        self.session: str | None = None
        self.established = False

    @property
    def agent_protocol(self) -> AgentProtocol:
        """Return this protocol itself (reachable through the proxies ClientService wraps around it)."""
        return self

    # -- session start -------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Say ``hello`` with this node's identity; the reply starts the heartbeats."""
        self.identity = ident = self._platform.identity()
        self._log = log.bind(node=ident.node)
        self._last_received = self._clock.seconds()
        if self._installs is None:
            self._installs = InstallRunner(self._platform, self._clock, node=ident.node)
        secret = self._token.hello_fields() if isinstance(self._token, InstallerCredentials) else {"token": self._token}
        install = self._installs.status()
        extra = {"install": install} if install is not None else {}
        self._hello_id, d = self._start_request(
            "hello", timeout=self.hello_timeout, proto=PROTOCOL_VERSION, role=AGENT_ROLE, node=ident.node,
            mode=ident.mode, image=ident.image, boot_id=ident.boot_id, agent=self._agent, **secret, **extra)
        d.addCallbacks(self._hello_ok, self._hello_failed)

    def when_ready(self) -> Deferred[Message]:
        """Return a Deferred firing with cidd's hello reply, or failing when the session did not start.

        Cancelling it aborts the connection.
        """
        d: Deferred[Message] = Deferred(lambda _d: self._abort())
        if self._outcome is None:
            self._waiters.append(d)
        elif isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)
        return d

    def _settle(self, outcome: Message | Failure) -> None:
        """Record the session start's outcome and hand it to every waiter still waiting."""
        if self._outcome is not None:
            return
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if d.called:
                continue
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def _hello_ok(self, answer: Message) -> None:
        """Take the heartbeat interval from cidd's reply, start heartbeats, and fire the ready waiters."""
        if isinstance(self._token, InstallerCredentials):
            self._token.accepted(answer)
        try:
            interval = get_number(answer, "heartbeat", DEFAULT_HEARTBEAT)
        except BadRequest:
            interval = None
        if not interval:
            self._log.warning("agent.bad_heartbeat", value=answer.get("heartbeat"), used=DEFAULT_HEARTBEAT)
            interval = DEFAULT_HEARTBEAT
        self.heartbeat = interval
        self.session = answer.get("session") if isinstance(answer.get("session"), str) else None
        self.established = True
        self._log.info("agent.connected", server=answer.get("server"), session=self.session,
                       heartbeat=interval, mode=self.identity.mode if self.identity else None,
                       image=self.identity.image if self.identity else None)
        self._heartbeat_call = self._clock.callLater(interval, self._tick)
        assert self._installs is not None
        self._installs.attach(self.send)
        self._settle(answer)

    def _hello_failed(self, failure: Failure) -> None:
        """Log why cidd refused the session (never the token), close it, and fail the ready waiters."""
        if failure.check(AuthError):
            self._log.error("agent.auth_failed", message=failure.value.message)
        elif failure.check(CidError) and not failure.check(SessionLost, RequestTimeout):
            self._log.error("agent.hello_refused", code=failure.value.code, message=failure.value.message)
        else:
            self._log.info("agent.hello_failed", reason=failure.getErrorMessage())
        self._close()
        self._settle(failure)

    # -- sending ---------------------------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Write ``message`` as one line (dropped when the session is closing)."""
        if self.transport is not None and not self._closing:
            self.transport.write(encode(message))

    def request(self, kind: str, **fields: Any) -> Deferred[Message]:
        """Send a ``kind`` request; return a Deferred firing with the reply.

        It fails with the server's error (AuthError, CidError...), RequestTimeout (the session is then aborted),
        or SessionLost.
        """
        return self._start_request(kind, **fields)[1]

    def _start_request(self, kind: str, timeout: float | None = None, **fields: Any) -> tuple[Any, Deferred[Message]]:
        """Send a ``kind`` request; return (its id, the Deferred of its answer within ``timeout``, by default the
        request timeout)."""
        request_id, d = self._requests.start(kind, self.request_timeout if timeout is None else timeout)
        self.send({"type": kind, "id": request_id, **fields})
        return request_id, d

    def _request_timed_out(self, pending: Pending[Any]) -> BaseException:
        """Treat the session as half-open: log, abort the connection; return the request's error."""
        timeout = self.hello_timeout if pending.id == self._hello_id else self.request_timeout
        self._log.warning("agent.request_timeout", request=pending.kind, id=pending.id, timeout=timeout)
        self._abort()
        return RequestTimeout(f"cidd did not answer '{pending.kind}' within {timeout:g} s; "
                              "the session was dropped and will be re-opened")

    # -- heartbeats ------------------------------------------------------------------------------------------

    def _tick(self, confirmed: bool = False) -> None:
        """Send a heartbeat with health figures, unless cidd has been silent for too long (then abort).

        Silence is ``confirmed`` one turn of the reactor later, once what waits on the socket was read (a busy
        process runs its timers before it reads: cidcommon.twisted_requests.after_reads).
        """
        self._heartbeat_call = None
        if self._closing or self.heartbeat is None:
            return
        silent = self._clock.seconds() - self._last_received
        if silent >= SILENCE_FACTOR * self.heartbeat and not confirmed:
            self._heartbeat_call = self._clock.callLater(0, self._tick, True)
            return
        if silent >= SILENCE_FACTOR * self.heartbeat:
            self._log.warning("agent.server_silent", silent=round(silent, 1), limit=SILENCE_FACTOR * self.heartbeat)
            self._abort()
            return
        try:
            health = {k: v for k, v in self._platform.health().items() if v is not None}
        except Exception as exc:  # a broken sensor must not stop the liveness probe
            self._log.warning("agent.health_failed", error=str(exc))
            health = {}
        self.request("heartbeat", **health).addCallbacks(self._heartbeat_answered, lambda _f: None)
        self._heartbeat_call = self._clock.callLater(self.heartbeat, self._tick)

    def _heartbeat_answered(self, answer: Message) -> None:
        """Adopt the interval a heartbeat's answer carries, if any: cidd lengthens it when it serves many agents
        (docs/protocol.md). It applies from the next heartbeat scheduled; an unusable value is ignored."""
        value = answer.get("heartbeat")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == self.heartbeat:
            return
        self._log.info("agent.heartbeat_changed", old=self.heartbeat, new=value)
        self.heartbeat = float(value)

    # -- receiving -------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split ``data`` into lines and handle each; a too-long line closes the session."""
        if self._closing:
            return
        self._last_received = self._clock.seconds()
        try:
            lines = self._buffer.feed(data)
        except LineTooLong as exc:
            self._log.warning("agent.line_too_long", message=exc.message)
            self.send(error("too_long", f"{exc.message}; closing the session"))
            self._close()
            return
        for line in lines:
            if self._closing:
                return
            if line.strip():
                self._line(line)

    def _line(self, line: bytes) -> None:
        """Decode one line and dispatch it; bad lines get an ``error`` answer, the session stays open."""
        try:
            message = decode(line)
        except ProtocolError as exc:
            self._log.warning("agent.bad_message", message=exc.message)
            self.send(error("bad_message", exc.message, _salvage_id(line)))
            return
        kind = message["type"]
        if kind == "reply":
            self._on_reply(message)
        elif kind == "error":
            self._on_error(message)
        else:
            self._on_request(kind, message)

    def _on_reply(self, message: Message) -> None:
        """Fire the Deferred of the request this reply answers."""
        if not self._requests.answer(message.get("id"), message):
            self._log.debug("agent.unexpected_reply", id=message.get("id"))

    def _on_error(self, message: Message) -> None:
        """Fail the request an ``error`` answers; ``superseded`` closes the session."""
        err = server_error(message)
        if err.code == "superseded":
            self._log.warning("agent.superseded", message=err.message)
            if self._on_superseded is not None:
                self._on_superseded()
            self._close()
            return
        request_id = message.get("id")
        if request_id is None and self._requests.waits_for(self._hello_id):
            request_id = self._hello_id  # an id-less error before the hello reply answers the hello
        if self._requests.fail(request_id, err) is None:
            self._log.warning("agent.server_error", code=err.code, message=err.message, id=request_id)

    def _on_request(self, kind: str, message: Message) -> None:
        """Answer a request from cidd: run its handler, or send the ``error`` it deserves."""
        request_id = message.get("id")
        handler = {"reboot": self._reboot, "install": self._install}.get(kind)
        try:
            if handler is None:
                raise CidError(f"{self._agent} does not know the message type {kind!r}; "
                               "it understands: reboot, install", code="unknown_type")
            if request_id is None:
                raise ProtocolError(f"a {kind!r} request needs an 'id'")
            if not self.established:
                raise CidError(f"{kind!r} arrived before the reply to hello", code="out_of_order")
            handler(request_id, message)
        except CidError as exc:
            self._log.warning("agent.request_refused", request=kind, id=request_id, code=exc.code,
                              message=exc.message)
            self.send(error(exc.code, exc.message, request_id))
        except Exception as exc:
            self._log.exception("agent.request_crashed", request=kind, id=request_id)
            self.send(error("internal", f"cidkid failed on {kind!r} ({exc}); see the agent's log on the node",
                            request_id))

    def _reboot(self, request_id: Any, message: Message) -> None:
        """Check ``boot`` and ``method``, reply, then (next turn of the clock) ask the platform to reboot."""
        boot = get_str(message, "boot")
        if boot not in BOOT_TARGETS:
            raise BadRequest(f"'boot' must be one of {', '.join(BOOT_TARGETS)}, not {boot!r}")
        method = str(get_str(message, "method", required=False, default="reboot"))
        methods = sorted(self._platform.reboot_methods)
        if method not in methods:
            raise BadRequest(f"this agent cannot reboot with method {method!r}; it supports: {', '.join(methods)}")
        spec = parse_spec(method, message)
        self.send(reply(request_id))
        self._log.info("agent.reboot_requested", boot=boot, method=method, id=request_id, kernel=spec.kernel,
                       entry=spec.entry)
        self._clock.callLater(0, self._do_reboot, boot, method, spec)

    def _do_reboot(self, boot: str, method: str, spec: RebootSpec) -> None:
        """Call ``platform.reboot``, logging (not raising) what goes wrong."""
        try:
            self._platform.reboot(boot, method, spec)
        except Exception:
            self._log.exception("agent.reboot_failed", boot=boot, method=method)

    def _install(self, request_id: Any, message: Message) -> None:
        """Refuse outside installer mode; otherwise reply at once, then start the install."""
        assert self.identity is not None and self._installs is not None
        if self.identity.mode != "installer":
            raise BadRequest(f"node {self.identity.node} runs its installed system, not the installer; "
                             "reboot it with boot=installer before asking for an install")
        request = parse_install(message)
        attempt = get_number(message, "attempt")
        attempt = int(attempt) if attempt is not None else None
        decision = self._installs.decide(request, attempt)
        if decision == "running":
            self.send(reply(request_id, running=True))
        elif decision == "done":  # finished in this boot: its result again, never a second run over it
            self.send(reply(request_id, done=True))
            self._installs.redeliver()
        else:
            self.send(reply(request_id))
            self._installs.start(request, attempt)

    # -- closing ---------------------------------------------------------------------------------------------

    def _close(self) -> None:
        """Close the session gracefully (pending writes are flushed first)."""
        if not self._closing and self.transport is not None:
            self._closing = True
            self.transport.loseConnection()

    def _abort(self) -> None:
        """Drop the session at once, without flushing."""
        self._closing = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport, not ITransport

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Stop the heartbeats, fail every pending request, and hand install events to the next session."""
        self._closing = True
        if self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()
        self._heartbeat_call = None
        if self._installs is not None:
            self._installs.detach(self.send)
        if self.established:
            self._log.info("agent.disconnected", reason=reason.getErrorMessage(), session=self.session)
        self._requests.fail_all(lambda pending: SessionLost(f"the session closed before cidd answered "
                                                            f"'{pending.kind}'"))
        self._settle(Failure(SessionLost(f"the session closed: {reason.getErrorMessage()}")))
