"""A blocking session with cidd over one TCP connection, TLS by default (docs/protocol.md).

``connect`` opens it (retrying until a deadline), ``Connection.hello`` authenticates, ``Connection.request``
sends one request and returns its reply (raising the error class matching cidd's ``code``), and
``Connection.next_message`` reads the events of a watched capture with a timeout. No reactor, no threads.
"""

from __future__ import annotations

import collections
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cidcapt import __version__
from cidcapt.errors import BadServerReply, ConnectionLost, Unreachable, error_from_wire
from cidcommon.errors import ProtocolError
from cidcommon.hostport import format_hostport, parse_hostport
from cidcommon.requests import PendingRequests
from cidcommon.tlsfiles import ClientTls, TlsError, untrusted_message
from cidcommon.wire import DEFAULT_PORT, MAX_REPLY_LINE, PROTOCOL_VERSION, LineBuffer, Message, decode, encode

Clock = Callable[[], float]
Sleep = Callable[[float], None]


@dataclass(frozen=True)
class Timing:
    """The client's intervals, in seconds; tests shrink them, nobody else needs to."""

    request_timeout: float = 30.0  # a request not answered in this time means the session is gone
    silence_timeout: float = 60.0  # nothing at all (not even a keepalive) for this long: the session is gone
    grace: float = 30.0  # the client waits this long after the capture's own timeout before giving up
    backoff_first: float = 0.5  # first pause between connection attempts
    backoff_max: float = 5.0  # the pause doubles up to this
    attempt_timeout: float = 5.0  # longest wait for one TCP connect


class Backoff:
    """Pauses between attempts: ``first``, doubling up to ``maximum``."""

    def __init__(self, first: float, maximum: float) -> None:
        self.first = first
        self.maximum = maximum
        self._next = first

    def next(self) -> float:
        """Return the pause to make now, and grow the following one."""
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        """Start again from the first pause (after a success)."""
        self._next = self.first


def parse_server(text: str) -> tuple[str, int]:
    """Return ``(host, port)`` of cidd's address (``cidcommon.hostport``; default port 38008). Raises ValueError."""
    return parse_hostport(text, DEFAULT_PORT)


format_address = format_hostport


def described(host: str, port: int, origin: str = "") -> str:
    """Return cidd's address for messages, with where it came from: ``/run/cid/cidd.sock (from /etc/cid/cidd.yaml,
    socket.path)``; the bare address when ``origin`` is empty (typed on the command line)."""
    address = format_address(host, port)
    return f"{address} (from {origin})" if origin else address


def _hint(host: str) -> str:
    """Return what to check when cidd at ``host`` (a socket path or a host name) cannot be reached."""
    if host.startswith("/"):
        return ("is cidd running, with its local socket there (socket.path in cidd.yaml)? check --socket or "
                "$CID_SOCKET; no other address is tried")
    return "is cidd running? check --server"


def _reason(exc: OSError) -> str:
    """Return a short lower-case reason for a socket error."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (exc.strerror or str(exc) or exc.__class__.__name__).lower()


def _open(host: str, port: int, timeout: float, tls: ClientTls | None) -> socket.socket:
    """Return a connected socket: to the Unix socket ``host`` when it is a path (no TLS: the peer's uid is what
    cidd checks), else over TCP, wrapped in TLS (server certificate and name verified) when ``tls`` is given.

    Raises TlsError when the server's certificate is not trusted by the CA file (not worth retrying), OSError
    (ssl.SSLError included) for the rest.
    """
    if host.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(host)
        except BaseException:
            sock.close()
            raise
        return sock
    context = tls.context if tls is not None else None  # raises TlsError for a missing or bad CA file
    sock = socket.create_connection((host, port), timeout=timeout)
    if context is None or tls is None:
        return sock
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        reason = exc.verify_message or exc.reason or str(exc)
        raise TlsError(untrusted_message(format_address(host, port), tls.ca, reason)) from None
    except BaseException:
        sock.close()
        raise


def connect(host: str, port: int, *, deadline: float, timing: Timing = Timing(), clock: Clock = time.monotonic,
            sleep: Sleep = time.sleep, tls: ClientTls | None = None, origin: str = "") -> Connection:
    """Return a Connection to cidd, retrying refused or timed-out attempts until ``deadline`` (``clock`` time).

    ``host`` may be the path of cidd's local Unix socket (then ``port`` and ``tls`` are ignored). Otherwise,
    with ``tls`` the session runs over TLS and cidd's certificate must be signed by ``tls.ca`` and name
    ``host``. One attempt is always made, even when ``deadline`` has passed. Raises Unreachable, saying why the
    last attempt failed and what to check, when no attempt succeeded by the deadline; TlsError at once when
    the server is not trusted. ``origin`` (where the address came from) is named in every message; no other
    address is ever tried.
    """
    address = described(host, port, origin)
    backoff = Backoff(timing.backoff_first, timing.backoff_max)
    while True:
        remaining = deadline - clock()
        try:
            sock = _open(host, port, max(min(remaining, timing.attempt_timeout), 0.1), tls)
        except ssl.SSLError as exc:
            reason = f"TLS handshake failed ({exc.reason or exc}); if cidd runs with tls mode plain, use --plain-tcp"
        except OSError as exc:
            reason = _reason(exc)
        else:
            return Connection(sock, address=address, request_timeout=timing.request_timeout, clock=clock)
        remaining = deadline - clock()
        if remaining <= 0:
            raise Unreachable(f"cannot reach cidd at {address}: {reason}; {_hint(host)}", reason=reason)
        sleep(min(backoff.next(), remaining))


class Connection:
    """One session with cidd on an already-connected socket; close it with ``close`` or ``with``."""

    def __init__(self, sock: socket.socket, *, address: str = "cidd", request_timeout: float = 30.0,
                 clock: Clock = time.monotonic, max_line: int = MAX_REPLY_LINE) -> None:
        self.sock = sock
        self.address = address
        self.request_timeout = request_timeout
        self.clock = clock
        self._buffer = LineBuffer(max_line)
        self._queue: collections.deque[Message] = collections.deque()
        self._requests: PendingRequests[None] = PendingRequests()  # ids and the one request waiting
        self._closed = False

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def send(self, message: Message) -> None:
        """Send one message. Raises ConnectionLost when the socket is closed or broken."""
        if self._closed:
            raise ConnectionLost(f"the connection to cidd at {self.address} is closed", reason="connection closed")
        try:
            self.sock.settimeout(self.request_timeout)
            self.sock.sendall(encode(message))
        except OSError as exc:
            raise ConnectionLost(f"cannot send to cidd at {self.address}: {_reason(exc)}",
                                 reason=f"cannot send: {_reason(exc)}") from None

    def next_message(self, timeout: float | None) -> Message | None:
        """Return the next message from cidd, or None when none arrived within ``timeout`` seconds.

        Raises ConnectionLost when cidd closes the session or the socket fails, BadServerReply when a line
        is not a protocol message (too long, not JSON, no type).
        """
        if self._queue:
            return self._queue.popleft()
        end = None if timeout is None else self.clock() + timeout
        while not self._queue:
            if self._closed:
                raise ConnectionLost(f"the connection to cidd at {self.address} is closed", reason="connection closed")
            wait = None if end is None else end - self.clock()
            if wait is not None and wait <= 0:
                return None
            try:
                self.sock.settimeout(wait)
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as exc:
                raise ConnectionLost(f"the connection to cidd at {self.address} failed: {_reason(exc)}",
                                     reason=_reason(exc)) from None
            if not data:
                raise ConnectionLost(f"cidd at {self.address} closed the connection",
                                     reason="cidd closed the connection")
            self._take(data)
        return self._queue.popleft()

    def _take(self, data: bytes) -> None:
        """Decode the lines finished by ``data`` into the queue; raise BadServerReply on a bad line."""
        try:
            for line in self._buffer.feed(data):
                if line.strip():
                    self._queue.append(decode(line))
        except ProtocolError as exc:
            self.close()
            raise BadServerReply(
                f"{self.address} sent something that is not a cid message ({exc.message}); "
                "check that --server names cidd's protocol port, not another service"
            ) from None

    def request(self, message: Message, *, timeout: float | None = None) -> Message:
        """Send ``message`` (its ``id`` is chosen here) and return cidd's ``reply`` to it.

        Other messages that arrive meanwhile are kept for ``next_message``. Raises the error class matching
        the code of an ``error`` answer (cidcapt.errors.error_from_wire), ConnectionLost when the session
        ends or no answer came within ``timeout`` (default: the request timeout), BadServerReply on garbage.
        """
        limit = self.request_timeout if timeout is None else timeout
        end = self.clock() + limit
        request_id = self._requests.add(str(message["type"]), None, end).id
        message = {**message, "id": request_id}
        self.send(message)
        held: list[Message] = []
        try:
            while True:
                incoming = self.next_message(end - self.clock())
                if incoming is None:
                    self._requests.expired(self.clock())
                    self.close()
                    reason = f"cidd did not answer '{message['type']}' within {limit:g} s"
                    raise ConnectionLost(f"{reason} (at {self.address})", reason=reason)
                kind, answer_id = incoming.get("type"), incoming.get("id")
                if kind == "error" and answer_id in (request_id, None):
                    self._requests.take(request_id)
                    raise error_from_wire(incoming)
                if kind == "reply" and answer_id == request_id:
                    self._requests.take(request_id)
                    return incoming
                if kind not in ("reply", "error"):
                    held.append(incoming)  # an event sent before the reply: keep it for the caller
        finally:
            self._queue.extendleft(reversed(held))

    def hello(self, role: str, token: str, *, client: str = f"cidcapt {__version__}") -> Message:
        """Open the session as ``role`` with ``token``; return cidd's reply (server, session, ...).

        An empty ``token`` sends none (the local Unix socket, where cidd checks the peer's uid instead).
        Raises AuthError for a wrong token or protocol version, and what ``request`` raises.
        """
        secret = {"token": token} if token else {}
        return self.request({"type": "hello", "proto": PROTOCOL_VERSION, "role": role, **secret, "client": client})


def open_session(host: str, port: int, role: str, token: str, *, deadline: float, timing: Timing = Timing(),
                 clock: Clock = time.monotonic, sleep: Sleep = time.sleep, tls: ClientTls | None = None,
                 origin: str = "") -> Connection:
    """Return a connected Connection on which ``hello`` succeeded (see ``connect`` and ``Connection.hello``)."""
    conn = connect(host, port, deadline=deadline, timing=timing, clock=clock, sleep=sleep, tls=tls, origin=origin)
    try:
        conn.hello(role, token)
    except ConnectionLost as exc:
        conn.close()
        if tls is None and not host.startswith("/"):  # a TLS server drops a clear-text hello
            raise ConnectionLost(f"{exc.message}; cidd speaks TLS unless configured with tls mode plain: drop "
                                 "--plain-tcp (and CID_PLAIN_TCP) and give its CA with --ca",
                                 reason=exc.reason) from None
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def simple_request(host: str, port: int, role: str, token: str, message: dict[str, Any], *,
                   connect_timeout: float, timing: Timing = Timing(), clock: Clock = time.monotonic,
                   sleep: Sleep = time.sleep, tls: ClientTls | None = None, origin: str = "") -> Message:
    """Return cidd's reply to one request made in a fresh session (used by --status and --captures).

    Raises Unreachable when cidd cannot be reached within ``connect_timeout`` seconds, and what
    ``Connection.request`` raises.
    """
    deadline = clock() + connect_timeout
    with open_session(host, port, role, token, deadline=deadline, timing=timing, clock=clock, sleep=sleep,
                      tls=tls, origin=origin) as conn:
        return conn.request(message)
