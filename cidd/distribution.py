"""Image distribution by multicast: cidd groups the nodes that install the same image at about the same time into
one udpcast session and sends the image once to all of them (docs/distribution.md).

For a group whose cidd.yaml says ``distribution: {method: multicast}``, ``Distributor.take`` receives every
``install`` the engine would send. It puts the node into the *gathering* session of that image (opening one when
there is none: a UDP port pair of its own, ``port_base + 2k``), and sends the node its ``install`` with a
``distribution`` field once the image's piece digests are known (``piece_digests``, computed in a thread from
the catalogued file and cached by its identity). ``gather`` seconds after the session opened, cidd starts
``udp-sender`` (a child process) for exactly the nodes gathered; it waits up to ``wait`` seconds for their
receivers, then multicasts the file; a receiver that stops answering is dropped after ``drop_after``
retransmission rounds, so the others go on. A node that comes later opens the next session.

HTTP stays the fallback, per node, always with a reason (``dist.fallback``, and ``distribution.fallback`` in the
node's status): cidd sends the plain HTTP ``install`` when the group uses HTTP, the image is private (never
multicast), udp-sender is missing, the image file cannot be read or every session port is busy; an installer
that gives the multicast up (no sender, a stall, a piece failing its check, no udp-receiver) continues over
HTTP from its last good piece and tells cidd why in its request (``X-Cid-Fallback``, see ``report_fallback``).

Twisted code for the reactor thread; the digests are computed in the reactor's thread pool.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorThreads, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from cidcatalog.catalog import Image
from cidd.config import Config

log = structlog.get_logger("cidd.distribution")

SENDER = "udp-sender"
#: A piece is at least this big; larger images get larger pieces so that they have at most MAX_PIECES.
MIN_PIECE = 4 << 20
MAX_PIECES = 1024
#: Bytes of each piece's sha256 sent to the installer (cidinstall.types.PIECE_DIGEST).
PIECE_DIGEST = 16
#: Seconds an installer waits for the sender beyond the gather and wait times (its start, ARP, rendezvous).
START_MARGIN = 15.0
#: Lines of udp-sender's output kept for the log.
SAID_LINES = 8

Send = Callable[[str, dict[str, Any]], None]


def piece_size_for(size: int) -> int:
    """Return the piece size for a file of ``size`` bytes: MIN_PIECE, or more (whole MiB) to stay <= MAX_PIECES."""
    piece = MIN_PIECE
    while -(-size // piece) > MAX_PIECES:
        piece += 1 << 20
    return piece


def piece_digests(path: Path) -> tuple[int, int, bytes]:
    """Return (size, piece size, digests) of the file ``path``: the first PIECE_DIGEST bytes of each piece's
    sha256, concatenated. Blocking (reads the whole file); raises OSError."""
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        piece = piece_size_for(size)
        buffer = bytearray(piece)
        view = memoryview(buffer)
        digests = bytearray()
        while True:
            got = 0
            while got < piece:
                n = handle.readinto(view[got:])
                if not n:
                    break
                got += n
            if not got:
                break
            digests += hashlib.sha256(view[:got]).digest()[:PIECE_DIGEST]
            if got < piece:
                break
    return size, piece, bytes(digests)


@dataclass
class Session:
    """One multicast transfer of one image to the nodes gathered for it."""

    id: int
    image: Image
    group: str
    path: Path
    port: int
    opened: float
    state: str = "hashing"  # hashing -> gathering -> sending -> done
    members: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> its install message
    size: int = 0
    piece_size: int = 0
    digests: bytes = b""
    gathered: bool = False
    connected: int = 0
    started: float | None = None
    said: deque[str] = field(default_factory=lambda: deque(maxlen=SAID_LINES))
    process: Any = None
    timers: list[IDelayedCall] = field(default_factory=list)
    failure: str | None = None  # why the session could not send (its members went over HTTP)


class SenderProtocol(ProcessProtocol):
    """Reads udp-sender's output into its session and tells the distributor when it ended."""

    def __init__(self, distributor: Distributor, session: Session) -> None:
        self.distributor = distributor
        self.session = session
        self._partial = b""

    def connectionMade(self) -> None:
        """Close the sender's stdin: it never reads a keyboard (``--nokbd``)."""
        assert self.transport is not None
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._lines(data)

    def errReceived(self, data: bytes) -> None:
        self._lines(data)

    def _lines(self, data: bytes) -> None:
        text = (self._partial + data).replace(b"\r", b"\n")
        *lines, self._partial = text.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line or line.startswith("bytes="):
                continue
            if line.startswith("New connection from"):
                self.session.connected += 1
            elif line.startswith("Starting transfer"):
                self.session.started = time.monotonic()
                log.info("dist.session_sending", session=self.session.id, image=self.session.image.id,
                         connected=self.session.connected, members=len(self.session.members))
            elif "ropping" in line:  # "Dropping client #3 because of timeout"
                log.warning("dist.receiver_dropped", session=self.session.id, image=self.session.image.id,
                            said=line[:200])
            self.session.said.append(line[:200])

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.distributor.sender_ended(self.session, code, signal)


_distributors: weakref.WeakSet[Distributor] = weakref.WeakSet()


def report_fallback(node: str | None, image: str, reason: str, client: str, offset: int) -> None:
    """An installer asked cidd's HTTP port for ``image`` saying it gave the multicast up for ``reason``: log it
    and show it in the node's status (called by cidd.images_http for requests carrying ``X-Cid-Fallback``)."""
    log.warning("dist.fallback", node=node, image=image, reason=reason, client=client, offset=offset,
                where="installer")
    for distributor in list(_distributors):
        distributor.fallback_reported(node, image, reason)


class Distributor:
    """The multicast sessions of one cidd (see the module docstring).

    ``send(node, message)`` sends an ``install`` (the engine checks that the node still waits for it);
    ``spawn`` is IReactorProcess.spawnProcess (None: no child processes, so every install uses HTTP);
    ``in_thread(f)`` runs ``f`` in a thread and returns a Deferred; ``which`` finds udp-sender.
    """

    def __init__(self, config: Config, clock: IReactorTime, image_dir: Path, send: Send, *,
                 spawn: Callable[..., Any] | None = None,
                 in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
                 which: Callable[[str], str | None] = shutil.which) -> None:
        self.config = config
        self.clock = clock
        self.image_dir = image_dir
        self.send = send
        self.spawn = spawn if spawn is not None else (
            clock.spawnProcess if IReactorProcess.providedBy(clock) else None)  # type: ignore[attr-defined]
        if in_thread is None and IReactorThreads.providedBy(clock):
            def in_thread(f: Callable[[], Any]) -> Deferred[Any]:
                return deferToThreadPool(clock, clock.getThreadPool(), f)  # type: ignore[attr-defined]
        self.in_thread = in_thread or (lambda f: maybeDeferred(f))
        self.which = which
        self.sessions: dict[int, Session] = {}
        self.views: dict[str, dict[str, Any]] = {}
        self._digests: dict[tuple[str, int, int, int], tuple[int, int, bytes]] = {}
        self._next = 1
        self._stopped = False
        _distributors.add(self)

    # --- the engine's side --------------------------------------------------------------------------

    def take(self, node: str, group: str, message: dict[str, Any], image: Image | None) -> bool:
        """Return True when ``node``'s ``install`` ``message`` goes by multicast (this distributor sends it, now
        or once the session is ready); False when the caller sends it as it is (HTTP), the reason logged."""
        dist = self.config.distribution_of(group)
        if dist.method != "multicast" or image is None or not message.get("url"):
            self.views.pop(node, None)
            return False
        if image.visibility == "private":
            return self._http(node, image.id, "private images are sent over HTTP only, never by multicast")
        if self._stopped or self.spawn is None or self.which(SENDER) is None:
            return self._http(node, image.id, f"{SENDER} (Debian package udpcast) is not installed on the head "
                              "node")
        session = self._gathering(image.id, group) or self._open(image, group)
        if session is None:
            return self._http(node, image.id, f"all {dist.sessions} multicast sessions of group {group} are busy")
        if session.state == "done":  # its image file could not be read
            return self._http(node, image.id, session.failure or "the multicast session failed")
        session.members[node] = message
        self.views[node] = {"method": "multicast", "session": session.id, "port": session.port,
                            "state": session.state, "fallback": None}
        log.info("dist.joined", node=node, image=image.id, session=session.id, port=session.port,
                 members=len(session.members), state=session.state)
        if session.state == "gathering":
            self._send(session, node)
        return True

    def view(self, node: str) -> dict[str, Any] | None:
        """Return how ``node``'s last install got its bytes, for its status (None: plain HTTP, nothing to say)."""
        view = self.views.get(node)
        if view is None:
            return None
        session = self.sessions.get(view.get("session", -1))
        return {**view, "state": session.state if session is not None else view.get("state")}

    def fallback_reported(self, node: str | None, image: str, reason: str) -> None:
        """Record that ``node``'s installer continues ``image`` over HTTP because of ``reason``."""
        if node is None or node not in self.views:
            return
        self.views[node] = {**self.views[node], "method": "http", "fallback": reason, "state": "fallback"}

    def stop(self) -> None:
        """Stop every sender and timer (cidd is stopping); later installs go over HTTP."""
        self._stopped = True
        for session in list(self.sessions.values()):
            self._cancel_timers(session)
            if session.process is not None:
                try:
                    session.process.signalProcess("KILL")
                except Exception:  # already gone
                    pass

    # --- sessions -----------------------------------------------------------------------------------

    def _http(self, node: str, image: str, reason: str) -> bool:
        log.warning("dist.fallback", node=node, image=image, reason=reason, where="cidd")
        self.views[node] = {"method": "http", "fallback": reason, "state": "fallback"}
        return False

    def _gathering(self, image: str, group: str) -> Session | None:
        for session in self.sessions.values():
            if session.image.id == image and session.group == group and session.state in ("hashing", "gathering"):
                return session
        return None

    def _open(self, image: Image, group: str) -> Session | None:
        """Open a session for ``image`` (None when every port of the group's range is in use)."""
        dist = self.config.distribution_of(group)
        used = {s.port for s in self.sessions.values()}
        ports = [dist.port_base + 2 * k for k in range(dist.sessions) if dist.port_base + 2 * k not in used]
        if not ports:
            return None
        session = Session(self._next, image, group, self.image_dir / image.file, ports[0], self.clock.seconds())
        self._next += 1
        self.sessions[session.id] = session
        log.info("dist.session_opened", session=session.id, image=image.id, group=group, port=session.port,
                 gather=dist.gather)
        session.timers.append(self.clock.callLater(dist.gather, self._gathered, session))
        self._hash(session)
        return session

    def _hash(self, session: Session) -> None:
        path = session.path
        try:
            root = os.path.realpath(self.image_dir)
            real = os.path.realpath(path)
            if os.path.commonpath([root, real]) != root:
                raise OSError(f"{session.image.file} resolves outside the image directory")
            info = os.stat(real)
        except OSError as exc:
            self._failed(session, f"cannot read the image file {path}: {exc.strerror or exc}")
            return
        key = (real, info.st_ino, info.st_size, info.st_mtime_ns)
        cached = self._digests.get(key)
        if cached is not None:
            self._hashed(cached, session, key)
            return
        started = time.monotonic()

        def digests() -> tuple[int, int, bytes]:
            return piece_digests(Path(real))

        d = self.in_thread(digests)
        d.addCallback(self._hashed, session, key, started)
        d.addErrback(lambda failure: self._failed(session, f"cannot read the image file {path}: "
                                                  f"{failure.getErrorMessage()}"))

    def _hashed(self, result: tuple[int, int, bytes], session: Session, key: tuple[str, int, int, int],
                started: float | None = None) -> None:
        if session.state != "hashing":
            return
        self._digests = {key: result}  # one image's digests are kept: the one of the running switch
        session.size, session.piece_size, session.digests = result
        if started is not None:
            log.info("dist.hashed", session=session.id, image=session.image.id, bytes=session.size,
                     pieces=len(session.digests) // PIECE_DIGEST, seconds=round(time.monotonic() - started, 2))
        session.state = "gathering"
        for node in list(session.members):
            self._send(session, node)
        if session.gathered:
            self._start(session)

    def _failed(self, session: Session, reason: str) -> None:
        """The session cannot send: every member gets its plain HTTP install, with ``reason``."""
        log.error("dist.session_failed", session=session.id, image=session.image.id, reason=reason)
        session.failure = reason
        self._close(session)
        for node, message in session.members.items():
            self._http(node, session.image.id, reason)
            self.send(node, message)

    def _send(self, session: Session, node: str) -> None:
        dist = self.config.distribution_of(session.group)
        until_start = max(0.0, session.opened + dist.gather - self.clock.seconds())
        field = {"method": "multicast", "session": session.id, "port": session.port, "size": session.size,
                 "piece_size": session.piece_size, "pieces": base64.b64encode(session.digests).decode("ascii"),
                 "start_timeout": round(until_start + dist.wait + START_MARGIN, 1),
                 # udp-receiver counts the sender's wait for missing receivers as silence too
                 "stall": dist.stall + dist.wait,
                 "node": node}
        self.send(node, {**session.members[node], "distribution": field})

    def _gathered(self, session: Session) -> None:
        session.gathered = True
        if session.state == "gathering":
            self._start(session)

    def _start(self, session: Session) -> None:
        """Start udp-sender for the nodes gathered."""
        dist = self.config.distribution_of(session.group)
        executable = self.which(SENDER)
        if executable is None or self.spawn is None:
            self._failed(session, f"{SENDER} (Debian package udpcast) is not installed on the head node")
            return
        argv = [SENDER, "--nokbd", "--file", str(session.path), "--portbase", str(session.port),
                "--min-receivers", str(len(session.members)), "--max-wait", str(max(1, round(dist.wait))),
                "--retries-until-drop", str(dist.drop_after)]
        if dist.rate_mbit:
            argv += ["--max-bitrate", f"{max(1, int(dist.rate_mbit))}m"]
        if dist.interface:
            argv += ["--interface", dist.interface]
        if dist.address:
            argv += ["--mcast-data-address", dist.address]
        session.state = "sending"
        protocol = SenderProtocol(self, session)
        try:
            session.process = self.spawn(protocol, executable, argv, env=dict(os.environ),
                                         childFDs={0: "w", 1: "r", 2: "r"})
        except Exception as exc:
            session.state = "gathering"
            self._failed(session, f"cannot start {SENDER}: {exc}")
            return
        log.info("dist.sender_started", session=session.id, image=session.image.id, port=session.port,
                 members=sorted(session.members), rate_mbit=dist.rate_mbit, argv=argv)
        # A sender that no receiver reaches would wait forever: stop it after the wait and a margin.
        session.timers.append(self.clock.callLater(dist.wait + START_MARGIN, self._no_receiver, session))

    def _no_receiver(self, session: Session) -> None:
        if session.state == "sending" and session.connected == 0 and session.process is not None:
            log.warning("dist.no_receiver", session=session.id, image=session.image.id, port=session.port)
            try:
                session.process.signalProcess("KILL")
            except Exception:
                pass

    def sender_ended(self, session: Session, code: int | None, signal: int | None) -> None:
        """udp-sender of ``session`` exited: log how, free the session's ports."""
        elapsed = time.monotonic() - session.started if session.started is not None else None
        fields: dict[str, Any] = {"session": session.id, "image": session.image.id, "port": session.port,
                                  "members": len(session.members), "connected": session.connected,
                                  "exit": code, "signal": signal, "bytes": session.size,
                                  "seconds": round(elapsed, 2) if elapsed is not None else None,
                                  "said": list(session.said)[-4:]}
        if code == 0:
            log.info("dist.session_ended", **fields)
        else:
            log.warning("dist.session_ended", **fields)
        self._close(session)

    def _close(self, session: Session) -> None:
        session.state = "done"
        self._cancel_timers(session)
        self.sessions.pop(session.id, None)
        for node in session.members:
            view = self.views.get(node)
            if view is not None and view.get("session") == session.id and view.get("state") != "fallback":
                view["state"] = "done"

    @staticmethod
    def _cancel_timers(session: Session) -> None:
        for timer in session.timers:
            if timer.active():
                timer.cancel()
        session.timers.clear()
