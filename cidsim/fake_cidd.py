"""A scripted fake cidd for tests: a real TCP server on 127.0.0.1 that speaks docs/protocol.md from a script.

Each accepted connection runs ``handler(session)`` in its own thread; the session reads and writes protocol
messages and checks what the client sent. Exceptions raised by handlers (failed checks) are collected and
raised again when the ``with FakeCidd(...)`` block ends, so a server-side check fails the test::

    def script(session: FakeSession) -> None:
        session.hello()                                  # checks proto, role and token; replies
        capture = session.expect("capture")
        session.accept(capture, {"node01": "to_installer"})
        session.node(capture, "node01", "to_installer", "ready", image=capture["image"])
        session.done(capture, "ok", {"node01": node_info("ready", capture["image"])})

    with FakeCidd(script, token="secret") as cidd:
        main(["--server", cidd.address, "--token-file", path, "-j", "1", "-n", "node01", "-i", "img"])
    assert cidd.messages("capture")[0]["nodes"] == "node01"

Plain sockets and threads, no Twisted, so it can also stand in for cidd in other programs' tests. It speaks
TLS like cidd, with a test CA made once per process (``test_ca_file()``; give clients ``CID_CA_FILE``), unless
``tls=False``.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from cidcommon.errors import ProtocolError
from cidcommon.wire import CLIENT_ROLES, PROTOCOL_VERSION, LineBuffer, decode, encode

Message = dict[str, Any]

_PKI: dict[str, Any] = {}
_PKI_LOCK = threading.Lock()


def _test_pki() -> dict[str, Any]:
    """Return {"ca": CA file, "context": server SSLContext} of a CA made once per process (removed at exit)."""
    with _PKI_LOCK:
        if not _PKI:
            from pathlib import Path

            from cidd.pki import cert_pem, create_ca, issue, key_pem, write_file

            directory = Path(tempfile.mkdtemp(prefix="cid-test-pki-"))
            atexit.register(shutil.rmtree, directory, True)
            ca_key, ca_cert = create_ca("cid test CA")
            key, cert = issue(ca_key, ca_cert, "fake-cidd", sans=["127.0.0.1", "::1", "localhost"], server=True)
            write_file(directory / "ca.pem", cert_pem(ca_cert), private=False)
            write_file(directory / "server.pem", cert_pem(cert), private=False)
            write_file(directory / "server.key", key_pem(key), private=True)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(directory / "server.pem"), str(directory / "server.key"))
            _PKI.update(ca=directory / "ca.pem", context=context, dir=directory)
        return _PKI


def test_ca_file() -> str:
    """Return the path of the CA certificate that signed every FakeCidd's certificate (for CID_CA_FILE)."""
    return str(_test_pki()["ca"])


def test_server_context() -> ssl.SSLContext:
    """Return the server SSLContext (certificate for 127.0.0.1 signed by the test CA) for other fake servers."""
    return _test_pki()["context"]


test_server_context.__test__ = False  # type: ignore[attr-defined]
test_ca_file.__test__ = False  # type: ignore[attr-defined]  # not a test for pytest


class SessionEnded(Exception):
    """Raised by a session helper to end the handler quietly (the session was closed on purpose)."""


class ClientClosed(AssertionError):
    """The client closed the connection while the script still expected a message."""


def node_info(state: str, image: str | None = None, reason: str | None = None) -> Message:
    """Return a node entry of a capture reply or ``done``: ``{"state", "image", "reason"}``."""
    return {"state": state, "image": image, "reason": reason}


class FakeSession:
    """One client connection seen by the fake cidd; ``index`` counts connections from 0."""

    def __init__(self, server: FakeCidd, sock: socket.socket, index: int) -> None:
        self.server = server
        self.sock = sock
        self.index = index
        self.received: list[Message] = []
        self.closed = False
        self._buffer = LineBuffer()
        self._lines: list[bytes] = []
        self._lock = threading.Lock()

    # Reading
    def recv(self, timeout: float = 5.0) -> Message:
        """Return the next message from the client.

        Raises ClientClosed when the client closes the connection, AssertionError on a timeout or a line
        that is not a protocol message.
        """
        end = time.monotonic() + timeout
        while not self._lines:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"fake cidd: no message from the client within {timeout:g} s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise ClientClosed(f"fake cidd: connection failed: {exc}") from None
            if not data:
                raise ClientClosed("fake cidd: the client closed the connection")
            self._lines.extend(self._buffer.feed(data))
        line = self._lines.pop(0)
        try:
            message = decode(line)
        except ProtocolError as exc:
            raise AssertionError(f"fake cidd: the client sent a bad line {line!r}: {exc.message}") from None
        self.received.append(message)
        self.server.log.append(message)
        return message

    def expect(self, kind: str, timeout: float = 5.0) -> Message:
        """Return the next message, asserting that its type is ``kind`` and that it has an ``id``."""
        message = self.recv(timeout)
        assert message.get("type") == kind, f"fake cidd: expected {kind!r}, got {message!r}"
        assert "id" in message, f"fake cidd: request without id: {message!r}"
        return message

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Return True once the client closed the connection, False if it did not within ``timeout``."""
        try:
            self.recv(timeout)
        except ClientClosed:
            return True
        except AssertionError:
            return False
        return False

    def keepalive_until_closed(self, interval: float = 0.05, timeout: float = 5.0) -> bool:
        """Send a keepalive every ``interval`` s until the client closes; return True if it did in time."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                self.send({"type": "keepalive"})
            except OSError:
                return True
            if self.wait_closed(interval):
                return True
        return False

    # Writing
    def send(self, message: Message) -> None:
        """Send one message to the client."""
        self.send_raw(encode(message))

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (for bad lines)."""
        with self._lock:
            self.sock.sendall(data)

    def hello(self, *, expect_role: str | None = None) -> Message:
        """Read the client's ``hello``, check it, and reply; return the hello message.

        Asserts that it is a ``hello`` with ``proto`` 1, a client role (``expect_role`` when given) and a
        ``token``. A token other than the server's gets an ``auth`` error and the session is closed
        (SessionEnded).
        """
        hello = self.expect("hello")
        assert hello.get("proto") == PROTOCOL_VERSION, f"fake cidd: hello without proto 1: {hello!r}"
        assert hello.get("role") in CLIENT_ROLES, f"fake cidd: hello with a bad role: {hello!r}"
        if expect_role is not None:
            assert hello["role"] == expect_role, f"fake cidd: role {hello['role']!r}, expected {expect_role!r}"
        assert isinstance(hello.get("token"), str), f"fake cidd: hello without token: {hello!r}"
        if hello["token"] != self.server.token:
            self.error(hello, "auth", f"wrong token for role {hello['role']}; use the token file of that role")
            self.drop()
            raise SessionEnded("auth refused")
        self.reply(hello, proto=PROTOCOL_VERSION, server="fake-cidd 0", heartbeat=10.0, session=f"s-{self.index}")
        return hello

    def reply(self, request: Message, **fields: Any) -> None:
        """Send a ``reply`` to ``request`` with ``fields``."""
        self.send({"type": "reply", "id": request["id"], **fields})

    def error(self, request: Message | None, code: str, message: str) -> None:
        """Send an ``error`` answering ``request`` (no ``id`` when ``request`` is None)."""
        msg: Message = {"type": "error", "code": code, "message": message}
        if request is not None:
            msg["id"] = request["id"]
        self.send(msg)

    def accept(self, capture: Message, nodes: dict[str, Any], *, state: str = "running",
               attached: bool = False, deadline: float | None = None) -> None:
        """Reply to a ``capture`` request; ``nodes`` maps a name to a state string or a node_info dict."""
        now = time.time()
        entries = {name: info if isinstance(info, dict) else node_info(info) for name, info in nodes.items()}
        self.reply(capture, capture={
            "job": capture["job"], "image": capture["image"], "state": state, "created": now,
            "deadline": deadline if deadline is not None else now + float(capture.get("timeout") or 3600),
            "attached": attached, "nodes": entries})

    def node(self, capture: Message, node: str, from_state: str, to_state: str, *, image: str | None = None,
             detail: str | None = None, attempt: int = 1, rung: int = 0) -> None:
        """Send a ``node`` state-change event of the capture's job."""
        self.send({"type": "node", "job": capture["job"], "node": node, "from": from_state, "to": to_state,
                   "image": image if image is not None else capture["image"], "attempt": attempt, "rung": rung,
                   "detail": detail})

    def progress(self, capture: Message, node: str, step: str, done: int, total: int) -> None:
        """Send a ``progress`` event of the capture's job."""
        self.send({"type": "progress", "job": capture["job"], "node": node, "step": step, "done": done,
                   "total": total})

    def done(self, capture: Message, state: str, nodes: dict[str, Any]) -> None:
        """Send the ``done`` event; ``nodes`` maps a name to a state string or a node_info dict."""
        entries = {name: info if isinstance(info, dict) else node_info(info) for name, info in nodes.items()}
        self.send({"type": "done", "job": capture["job"], "state": state, "nodes": entries})

    def drop(self) -> None:
        """Close the connection at once (what a restarting cidd does)."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
            except OSError:
                pass
            self.sock.close()

    def finish(self, timeout: float = 2.0) -> None:
        """Close gracefully: stop sending, wait for the client's close so no reply is lost, then close."""
        if self.closed:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                self.sock.settimeout(max(end - time.monotonic(), 0.01))
                if not self.sock.recv(65536):
                    break
        except OSError:
            pass
        self.drop()


class FakeCidd:
    """A fake cidd on 127.0.0.1 (a free port); use as a context manager or call ``start``/``stop``.

    ``handler`` runs once per connection. ``listen_delay`` keeps the port bound but refusing connections
    for that many seconds (to test connect retries). ``address`` is ``127.0.0.1:PORT`` for ``--server``.
    With ``tls`` (default) sessions run over TLS; ``ca_file`` is the CA clients must trust, and handshakes
    that failed are counted in ``tls_failures``.
    """

    def __init__(self, handler: Callable[[FakeSession], None], *, token: str = "test-token",
                 listen_delay: float = 0.0, tls: bool = True) -> None:
        self.handler = handler
        self.tls = tls
        self.ca_file = test_ca_file() if tls else None
        self.tls_failures = 0
        self.token = token
        self.listen_delay = listen_delay
        self.host = "127.0.0.1"
        self.sessions: list[FakeSession] = []
        self.errors: list[BaseException] = []
        self.log: list[Message] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, 0))
        self.port: int = self._listener.getsockname()[1]

    @property
    def address(self) -> str:
        """Return ``127.0.0.1:PORT``."""
        return f"{self.host}:{self.port}"

    def messages(self, kind: str | None = None) -> list[Message]:
        """Return every message received from clients (of type ``kind`` when given), in arrival order."""
        return [m for m in list(self.log) if kind is None or m.get("type") == kind]

    def start(self) -> FakeCidd:
        """Start serving in a background thread; return self."""
        thread = threading.Thread(target=self._serve, name="fake-cidd", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop accepting, close every session and wait for the threads (a few seconds at most)."""
        self._stopping.set()
        for session in list(self.sessions):
            session.drop()
        for thread in list(self._threads):
            thread.join(timeout=5.0)
        self._listener.close()

    def check(self) -> None:
        """Raise the first exception a handler raised (a failed server-side check), if any."""
        if self.errors:
            raise AssertionError(f"fake cidd handler failed: {self.errors[0]!r}") from self.errors[0]

    def __enter__(self) -> FakeCidd:
        return self.start()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.stop()
        if exc_type is None:
            self.check()

    def _serve(self) -> None:
        """Accept connections until stopped, each in its own thread."""
        if self.listen_delay > 0 and self._stopping.wait(self.listen_delay):
            return
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            session = FakeSession(self, sock, len(self.sessions))
            self.sessions.append(session)
            thread = threading.Thread(target=self._run, args=(session,), name=f"fake-cidd-{session.index}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, session: FakeSession) -> None:
        """Run the handler on one session, record its failures, and close the session."""
        if self.tls:
            try:
                session.sock.settimeout(5.0)
                session.sock = _test_pki()["context"].wrap_socket(session.sock, server_side=True)
            except OSError:
                self.tls_failures += 1
                session.drop()
                return
        try:
            self.handler(session)
        except SessionEnded:
            pass
        except BaseException as exc:  # reported to the test by check()
            if not (self._stopping.is_set() and isinstance(exc, OSError | ClientClosed)):
                self.errors.append(exc)
        finally:
            session.finish()
