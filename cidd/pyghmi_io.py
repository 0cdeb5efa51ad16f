"""pyghmi's shared IPMI I/O loop, replaced once per process before its first BMC call (``apply()``).

pyghmi (as of 1.6.19) runs one I/O thread per process: it ``select()``s on every IPMI socket, reads what arrived
and wakes the threads waiting for it. Four flaws in that loop hurt cidd, which calls several BMCs at once from its
power thread pool, and the simulated fleet, which runs a thousand BMC servers in one process:

1. **select() and descriptors from 1024 up.** ``select()`` cannot watch a descriptor >= 1024 (``FD_SETSIZE``).
   cidd opens pyghmi's socket at its first BMC call; with 1,100 agent sessions open that socket got descriptor
   1125, the I/O thread died at once with ``ValueError: filedescriptor out of range in select()``, and every
   later BMC call waited for an answer nobody read ("did not answer") until cidd was restarted. ``apply()``
   installs ``PollIOWorker`` in its place: ``poll()`` (no descriptor limit), only the sockets that have data are
   read (pyghmi read every socket at every wake-up: 1,000 simulated BMCs cost 2,000 system calls per packet), and
   it is woken through an ``eventfd`` of its own rather than a datagram sent to pyghmi's first socket.
2. **A dead I/O thread stays dead.** pyghmi starts its thread once; if it dies, nothing reads the sockets again.
   Every wait checks that the thread is alive (``watchdog()``); a dead one is logged
   (``pyghmi_io.io_thread_died`` with the error, then ``pyghmi_io.io_thread_restarted``) and started again, at
   most once every ``RESTART_BACKOFF`` seconds.
3. **A lock-order deadlock.** pyghmi guards its two session tables with two locks and takes them in both
   orders (``wait_for_rsp`` holds ``WAITING_SESSIONS`` while a timed-out session retransmits, which takes
   ``KEEPALIVE_SESSIONS``; ``send_payload`` takes them the other way round). Two threads retransmitting at once
   (BMCs that do not answer, or one that restarted) deadlocked, and from then on every BMC call of the process
   hung: in ``bench/chaos.py`` healthy nodes failed with "did not answer", all BMC threads held. ``apply()``
   makes both names one re-entrant lock.
4. **Lost wake-ups.** A thread that waits for an answer sleeps on an event that the I/O thread sets when a packet
   arrives. When another thread processed that answer first, the sleeper is not woken: it sleeps until its
   retransmit deadline (up to about 1 s per step, and a login has six steps), then retransmits. Four concurrent
   logins to OpenIPMI's ``ipmi_sim`` took 0.7 to 0.9 s instead of 0.01 s. Every wait here is capped at
   ``MAX_WAIT`` seconds; pyghmi's waiting loops all re-check their state, so a lost wake-up costs at most that
   (see ``bench/bmc_logins.py``). A waiter times its own wait, so it never depends on the I/O thread to end it.

And the send: ``_io_sendto`` made the shared socket blocking before each send while the reader made it
non-blocking before each read, so a send between the two left the reader blocked in ``recvfrom`` (read in
pyghmi's code; not reproduced). ``send_nonblocking`` leaves the socket non-blocking and, when the send buffer is
full, waits up to ``SEND_WAIT`` seconds (with ``poll()``) for room; a packet that still does not fit is dropped, as
pyghmi drops a failed send (IPMI retransmits).

Pure of any reactor; safe to call from any thread, any number of times.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MAX_WAIT = 0.02  # seconds: the longest a pyghmi thread sleeps before re-checking whether its answer came
SEND_WAIT = 1.0  # seconds: the longest a send waits for room in a full socket buffer
IDLE_POLL = 1.0  # seconds: the I/O thread re-reads pyghmi's socket list at least this often
RESTART_BACKOFF = 1.0  # seconds: the shortest time between two restarts of the I/O thread
FORGET_WAIT = 2.0  # seconds: the longest forget_sockets() waits for the I/O thread to drop the sockets

#: pyghmi's functions and globals the replacement relies on (a pyghmi without them is left alone).
_NEEDED = ("_io_wait", "_io_sendto", "_io_graball", "define_worker", "iosockets", "iothreadwaiters", "Session")

_lock = threading.Lock()  # apply() and restarts
_applied = False
_session: Any = None  # pyghmi.ipmi.private.session, once applied
_restarts = 0
_last_start = float("-inf")
_last_error: str | None = None

_waiters_lock = threading.Lock()
_directed: dict[Any, set[threading.Event]] = {}  # BMC address -> events of the threads waiting for its packets
_undirected: set[threading.Event] = set()  # threads waiting for any packet


class _Waker:
    """A descriptor that wakes the I/O thread's ``poll()``: an ``eventfd`` (a pipe where there is none).

    Created once per process and never closed, so a late ``wake()`` can never write into a reused descriptor.
    """

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.read_fd = self.write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            self.read_fd, self.write_fd = os.pipe()
            os.set_blocking(self.read_fd, False)
            os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        """Make the I/O thread's current or next ``poll()`` return at once; never raise."""
        try:
            os.write(self.write_fd, (1).to_bytes(8, "little"))
        except OSError:  # full: a wake-up is pending already
            pass

    def drain(self) -> None:
        """Consume the pending wake-ups (in the I/O thread)."""
        try:
            while os.read(self.read_fd, 4096):
                if self.read_fd == self.write_fd:
                    break
        except OSError:
            pass


_waker: _Waker | None = None


def apply() -> bool:
    """Replace pyghmi's I/O thread, wait and send (idempotent); return True when the replacements are in place.

    A pyghmi I/O thread started before (an earlier pyghmi user in this process) is asked to stop and replaced.
    Returns False, with a ``pyghmi_io.not_patched`` warning, when this pyghmi lacks the functions the replacement
    relies on (a newer pyghmi may have reorganised them): BMC calls then still work, with pyghmi's own loop.
    """
    global _applied, _session, _waker
    with _lock:
        if _applied:
            return True
        try:
            from pyghmi.ipmi.private import session
        except ImportError:
            log.warning("pyghmi_io.not_patched", reason="pyghmi is not installed")
            return False
        missing = [name for name in _NEEDED if not hasattr(session, name)]
        if missing:
            log.warning("pyghmi_io.not_patched", reason="this pyghmi lacks what the replacement relies on",
                        missing=",".join(missing), version=_version())
            return False
        _waker = _Waker()
        _session = session
        session._io_wait = io_wait
        session._io_sendto = send_nonblocking
        session.define_worker = define_worker
        # One lock for both session tables: pyghmi takes them in opposite orders (wait_for_rsp holds
        # WAITING_SESSIONS while a timed-out session retransmits, which takes KEEPALIVE_SESSIONS; send_payload
        # holds KEEPALIVE_SESSIONS and takes WAITING_SESSIONS), so two threads that retransmit at once deadlocked
        # every BMC call of the process for good. Both are read as module globals at each use.
        shared = threading.RLock()
        session.KEEPALIVE_SESSIONS = shared
        session.WAITING_SESSIONS = shared
        old = session.iothread
        if old is not None:
            _retire(session, old)
            _start_worker(session)
        _applied = True
        return True


def is_applied() -> bool:
    """Return True once ``apply()`` has replaced pyghmi's I/O loop in this process."""
    return _applied


def define_worker() -> type[PollIOWorker]:
    """Return the I/O thread class (pyghmi calls this when it opens its first socket)."""
    return PollIOWorker


def wait_time(timeout: float | None) -> float:
    """Return how long a wait for ``timeout`` seconds (None: no deadline) really sleeps: at most ``MAX_WAIT``."""
    return MAX_WAIT if timeout is None else max(0.0, min(timeout, MAX_WAIT))


def io_wait(timeout: float | None, myaddr: Any = None, evq: Any = None) -> None:
    """pyghmi's ``_io_wait``: sleep until a packet from ``myaddr`` (any packet when None) arrives, or at most
    ``wait_time(timeout)`` seconds; return None.

    ``evq`` (a session's command queue) gets the event, as in pyghmi, so that the session can wake this thread.
    Checks the I/O thread first (``watchdog()``) and wakes it when pyghmi opened a socket it does not poll yet.
    """
    watchdog()
    evt = threading.Event()
    if evq is not None:
        evq.append(evt)
    with _waiters_lock:
        if myaddr is None:
            _undirected.add(evt)
        else:
            _directed.setdefault(myaddr, set()).add(evt)
    worker = _session.iothread if _session is not None else None
    if isinstance(worker, PollIOWorker) and worker.signature != _signature(_session.iosockets):
        _wake()
    try:
        evt.wait(wait_time(timeout))
    finally:
        with _waiters_lock:
            if myaddr is None:
                _undirected.discard(evt)
            else:
                waiting = _directed.get(myaddr)
                if waiting is not None:
                    waiting.discard(evt)
                    if not waiting:
                        del _directed[myaddr]


def watchdog() -> bool:
    """Start pyghmi's I/O thread again if it died; return True when it did so now.

    Logs ``pyghmi_io.io_thread_restarted`` (with the number of restarts and what the dead thread died of). Restarts
    at most once every ``RESTART_BACKOFF`` seconds; returns False before ``apply()``, while pyghmi has not started
    its thread yet (it does at its first socket), and while the thread is alive.
    """
    session = _session
    if session is None:
        return False
    thread = session.iothread
    if thread is None or thread.is_alive():
        return False
    global _restarts
    with _lock:
        thread = session.iothread
        if thread is None or thread.is_alive() or time.monotonic() - _last_start < RESTART_BACKOFF:
            return False
        _restarts += 1
        log.warning("pyghmi_io.io_thread_restarted", restarts=_restarts, died_of=_last_error,
                    sockets=len(session.iosockets))
        _start_worker(session)
        return True


def restarts() -> int:
    """Return how many times ``watchdog()`` started the I/O thread again in this process."""
    return _restarts


def forget_sockets(sockets: Iterable[Any]) -> bool:
    """Take ``sockets`` out of pyghmi's I/O loop so that they can be closed; return True once none is polled.

    Waits up to ``FORGET_WAIT`` seconds for the I/O thread to re-read its socket list (at once when it is not
    running); returns False when it did not in that time (closing the sockets is still safe: a read of a closed
    socket fails and is ignored). Never raises.
    """
    from pyghmi.ipmi.private import session

    gone = {id(sock) for sock in sockets}
    session.iosockets[:] = [sock for sock in session.iosockets if id(sock) not in gone]
    worker = session.iothread
    if isinstance(worker, PollIOWorker) and worker.is_alive():
        return worker.resync(FORGET_WAIT)
    if worker is not None and worker.is_alive():  # pyghmi's own loop (apply() not called): it re-reads each round
        _send_wakeup_datagram(session)
        return False
    return True


def discard_session(ipmi_session: Any) -> None:
    """Make sure pyghmi never hands ``ipmi_session`` to a later ``Command``: take it out of every shared table.

    pyghmi shares one client session per BMC address in a process and keeps it while it believes it logged in.
    When the BMC goes away mid-call (power loss, BMC reset, a simulator killed) the logout fails half-way and the
    session stays registered as logged in, for about 30 s of keep-alive retries; every ``Command`` for that BMC in
    that time joined the dead session and waited for answers the BMC, restarted with no memory of it, never sent.
    Returns None; never raises.
    """
    from pyghmi.ipmi.private import session as pyghmi_session

    cls = pyghmi_session.Session
    try:
        for handlers in list(cls.bmc_handlers.values()):
            for port, candidate in list(handlers.items()):
                if candidate is ipmi_session:
                    handlers.pop(port, None)
        for address, handlers in list(cls.bmc_handlers.items()):
            if not handlers:
                cls.bmc_handlers.pop(address, None)
        for key, candidate in list(cls.initting_sessions.items()):
            if candidate is ipmi_session:
                cls.initting_sessions.pop(key, None)
        cls.keepalive_sessions.pop(ipmi_session, None)
        cls.waiting_sessions.pop(ipmi_session, None)
        ipmi_session.lastpayload = None
        if not hasattr(ipmi_session, "errormsg"):
            ipmi_session.errormsg = None  # read by pyghmi when it raises for a broken session: "no answer"
        ipmi_session.logged = 0
        ipmi_session.logging = False
        ipmi_session.broken = True
    except Exception as exc:  # noqa: BLE001 - pyghmi internals changed: leave the session as it is
        log.warning("pyghmi_io.discard_failed", error=repr(exc))


def discard_sessions_of(host: str, port: int) -> int:
    """Discard every pyghmi client session to the BMC at ``host``:``port`` except one carrying a console (SOL).

    cidd runs one call per BMC at a time and logs out after each, so a session still registered when the next
    call starts is one a failed call left behind (see ``discard_session``): the next call logs in afresh instead.
    Returns how many were discarded; never raises.
    """
    from pyghmi.ipmi.private import session as pyghmi_session

    cls = pyghmi_session.Session
    found: dict[int, Any] = {}
    try:
        for handlers in list(cls.bmc_handlers.values()):
            for candidate in list(handlers.values()):
                found[id(candidate)] = candidate
        for candidate in list(cls.initting_sessions.values()):
            found[id(candidate)] = candidate
        for candidate in list(cls.keepalive_sessions):
            found[id(candidate)] = candidate
    except RuntimeError:  # a table changed while it was read: the next call looks again
        return 0
    stale = [candidate for candidate in found.values()
             if getattr(candidate, "bmc", None) == host and getattr(candidate, "port", None) == port
             and getattr(candidate, "sol_handler", None) is None]
    for candidate in stale:
        discard_session(candidate)
    if stale:
        log.info("pyghmi_io.stale_sessions_discarded", bmc=f"{host}:{port}", count=len(stale))
    return len(stale)


class PollIOWorker(threading.Thread):
    """pyghmi's I/O thread with ``poll()``: reads the sockets that have data and wakes the threads waiting for it.

    It routes packets with pyghmi's own ``_io_graball`` (to the sessions' queues) and sets the events of the
    threads waiting for the packets' senders. It exits when ``running`` is cleared (``join()``, as pyghmi's own
    thread) and logs ``pyghmi_io.io_thread_died`` if its loop raises; ``watchdog()`` then starts another.
    """

    def __init__(self) -> None:
        super().__init__(name="pyghmi-io", daemon=True)
        self.running = True
        self.signature: tuple[int, int] = (-1, 0)  # _signature() of pyghmi's socket list at the last re-read
        self._synced = threading.Condition()
        self._requested = 0  # re-reads asked for by resync()
        self._served = 0  # the last request a re-read has served (it read the list after that request)

    def join(self, timeout: float | None = None) -> None:
        """Log out every session and stop the loop (what pyghmi's own thread does on join), then wait for it."""
        if _session is not None:
            _session.Session._cleanup()
        self.running = False
        _wake()
        super().join(timeout)

    def resync(self, timeout: float) -> bool:
        """Ask the loop to re-read pyghmi's socket list; return True once it has, False after ``timeout`` s."""
        with self._synced:
            self._requested += 1
            ticket = self._requested
        _wake()
        end = time.monotonic() + timeout
        with self._synced:
            while self._served < ticket:
                left = end - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return False
                self._synced.wait(min(left, 0.1))
            return True

    def run(self) -> None:
        """The loop: re-read the socket list when it changed, ``poll()``, read what arrived, wake its waiters."""
        global _last_error
        session = _session
        waker = _waker
        assert session is not None and waker is not None  # apply() set them before pyghmi could start this
        session.iothreadready = True
        while session.iothreadwaiters:
            session.iothreadwaiters.pop().set()
        poller = select.poll()
        poller.register(waker.read_fd, select.POLLIN)
        polled: dict[int, Any] = {}
        try:
            while self.running:
                if self.signature != _signature(session.iosockets):
                    self._sync(session, poller, polled)
                ready, woken = [], False
                for fd, mask in poller.poll(IDLE_POLL * 1000):
                    if fd == waker.read_fd:
                        woken = True
                    elif mask & select.POLLNVAL or fd not in polled or polled[fd].fileno() != fd:
                        woken = True  # a socket closed without forget_sockets() (its number may be reused)
                        poller.unregister(fd)
                        polled.pop(fd, None)
                    else:
                        ready.append(polled[fd])
                if woken:
                    waker.drain()
                    self._sync(session, poller, polled)
                if ready:
                    _wake_waiters(session._io_graball(ready, {}))
        except Exception as exc:
            _last_error = f"{type(exc).__name__}: {exc}"
            log.exception("pyghmi_io.io_thread_died", error=_last_error, sockets=len(polled))

    def _sync(self, session: Any, poller: Any, polled: dict[int, Any]) -> None:
        """Poll exactly the open sockets of pyghmi's list (``polled``: descriptor -> socket); serve the requests."""
        with self._synced:
            serving = self._requested
        sockets = list(session.iosockets)
        current: dict[int, Any] = {}
        for sock in sockets:
            fd = sock.fileno()
            if fd >= 0:
                current[fd] = sock
        for fd in [fd for fd in polled if fd not in current or current[fd] is not polled[fd]]:
            poller.unregister(fd)
            del polled[fd]
        for fd, sock in current.items():
            if fd not in polled:
                poller.register(fd, select.POLLIN)
                polled[fd] = sock
        self.signature = _signature(sockets)
        with self._synced:
            self._served = serving
            self._synced.notify_all()


def send_nonblocking(sock: Any, packet: bytes, address: Any) -> None:
    """Send one datagram on ``sock`` without ever switching it to blocking mode; return None, never raise.

    When the socket buffer is full, waits up to ``SEND_WAIT`` s for room (``poll()``: any descriptor number) and
    tries once more; a packet that still cannot be sent is dropped (the IPMI session retransmits), as pyghmi's own
    send does with any error.
    """
    if hasattr(sock, "fd"):  # eventlet's green socket, as pyghmi handles it
        sock = sock.fd
    try:
        sock.sendto(packet, address)
    except BlockingIOError:
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLOUT)
            poller.poll(SEND_WAIT * 1000)
            sock.sendto(packet, address)
        except (OSError, ValueError):
            return
    except OSError:
        return


def _signature(sockets: list[Any]) -> tuple[int, int]:
    """Return what tells a changed socket list cheaply: its length and its last socket (pyghmi appends)."""
    return (len(sockets), id(sockets[-1]) if sockets else 0)


def _wake() -> None:
    """Wake the I/O thread's ``poll()``."""
    if _waker is not None:
        _waker.wake()


def _wake_waiters(addresses: list[Any]) -> None:
    """Set the events of the threads waiting for a packet from one of ``addresses`` (any packet: every one)."""
    if not addresses:
        return
    with _waiters_lock:
        for evt in _undirected:
            evt.set()
        for address in set(addresses):
            for evt in _directed.get(address, ()):
                evt.set()


def _start_worker(session: Any) -> None:
    """Start a PollIOWorker as pyghmi's I/O thread and wait until it is ready (caller holds ``_lock``)."""
    global _last_start
    ready = threading.Event()
    session.iothreadready = False
    session.iothreadwaiters.append(ready)
    worker = PollIOWorker()
    session.iothread = worker
    _last_start = time.monotonic()
    worker.start()
    ready.wait(5)


def _retire(session: Any, thread: Any) -> None:
    """Ask pyghmi's own I/O thread (started before ``apply()``) to end after its current ``select()``."""
    if not thread.is_alive():
        return
    thread.running = False
    _send_wakeup_datagram(session)


def _send_wakeup_datagram(session: Any) -> None:
    """Break pyghmi's own loop out of ``select()``: a 1-byte datagram to its first socket; never raise."""
    try:
        anchor = session.iosockets[0]
        host = "127.0.0.1" if anchor.family == socket.AF_INET else "::1"
        anchor.sendto(b"\x01", (host, anchor.getsockname()[1]))
    except (OSError, IndexError, AttributeError):
        pass


def _version() -> str:
    """Return the installed pyghmi version, or ``unknown``."""
    try:
        from importlib.metadata import version

        return version("pyghmi")
    except Exception:  # noqa: BLE001 - only for a log field
        return "unknown"


__all__ = ["FORGET_WAIT", "IDLE_POLL", "MAX_WAIT", "RESTART_BACKOFF", "SEND_WAIT", "PollIOWorker", "apply",
           "define_worker", "forget_sockets", "io_wait", "is_applied", "restarts", "send_nonblocking", "wait_time",
           "watchdog"]
