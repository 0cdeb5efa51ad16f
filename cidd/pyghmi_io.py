"""Two fixes to pyghmi's shared IPMI I/O loop, applied once per process before its first BMC call (``apply()``).

pyghmi (as of 1.6.19) runs one I/O thread per process: it ``select()``s on every IPMI socket, reads what arrived
and wakes the threads waiting for it. Two flaws in that loop hurt cidd, which calls several BMCs at once from its
power thread pool:

1. **Lost wake-ups.** A thread that waits for an answer sleeps on an event that the I/O thread sets when a packet
   arrives or when the wait's deadline passes. When another thread processed that answer first, the sleeper is not
   woken: it sleeps until its retransmit deadline (up to about 1 s per step, and a login has six steps), then
   retransmits, which some BMCs (and pyghmi's own BMC server) answer badly. Four concurrent logins to OpenIPMI's
   ``ipmi_sim`` took 0.7 to 0.9 s (median of the slowest; up to 2.2 s) instead of 0.01 s, and under load a
   4 s call limit was sometimes missed. ``apply()`` caps every such wait at ``MAX_WAIT`` seconds; the waiting loops
   all re-check their state, so a lost wake-up now costs at most ``MAX_WAIT`` (see ``bench/bmc_logins.py``).
2. **A blocking toggle.** ``_io_sendto`` makes the shared socket blocking before each send, while the I/O thread
   makes it non-blocking before each read. A send between those two steps leaves the I/O thread blocked in
   ``recvfrom`` until a packet happens to arrive on that socket, stalling every BMC session of the process (read
   in pyghmi's code; not reproduced here, even with the window between the two steps widened).
   ``apply()`` replaces the send with one that leaves the socket non-blocking and, when the send buffer is full,
   waits up to ``SEND_WAIT`` seconds for room (a packet that still does not fit is dropped, as pyghmi drops a
   failed send; IPMI retransmits).

Pure of any reactor; safe to call from any thread, any number of times.
"""

from __future__ import annotations

import select
import threading
from typing import Any

import structlog

log = structlog.get_logger("cidd.pyghmi_io")

MAX_WAIT = 0.02  # seconds: the longest a pyghmi thread sleeps before re-checking whether its answer came
SEND_WAIT = 1.0  # seconds: the longest a send waits for room in a full socket buffer

_lock = threading.Lock()
_applied = False


def apply() -> bool:
    """Patch pyghmi's I/O loop (idempotent); return True when the fixes are in place.

    Returns False, with a ``pyghmi_io.not_patched`` warning, when this pyghmi lacks the functions the fixes replace
    (a newer pyghmi may have reorganised them): BMC calls then still work, with pyghmi's own behaviour.
    """
    global _applied
    with _lock:
        if _applied:
            return True
        try:
            from pyghmi.ipmi.private import session
        except ImportError:
            log.warning("pyghmi_io.not_patched", reason="pyghmi is not installed")
            return False
        original_wait = getattr(session, "_io_wait", None)
        if not callable(original_wait) or not callable(getattr(session, "_io_sendto", None)):
            log.warning("pyghmi_io.not_patched", reason="this pyghmi has no _io_wait/_io_sendto",
                        version=_version())
            return False
        session._io_wait = _bounded_wait(original_wait)
        session._io_sendto = send_nonblocking
        _applied = True
        return True


def is_applied() -> bool:
    """Return True once ``apply()`` has patched pyghmi in this process."""
    return _applied


def _bounded_wait(original: Any) -> Any:
    """Return pyghmi's ``_io_wait`` with every wait capped at ``MAX_WAIT`` seconds."""

    def _io_wait(timeout: float | None, myaddr: Any = None, evq: Any = None) -> Any:
        bounded = MAX_WAIT if timeout is None else max(0.0, min(timeout, MAX_WAIT))
        return original(bounded, myaddr, evq)

    _io_wait.__wrapped__ = original  # type: ignore[attr-defined]
    return _io_wait


def send_nonblocking(sock: Any, packet: bytes, address: Any) -> None:
    """Send one datagram on ``sock`` without ever switching it to blocking mode; return None, never raise.

    When the socket buffer is full, waits up to ``SEND_WAIT`` s for room and tries once more; a packet that still
    cannot be sent is dropped (the IPMI session retransmits), as pyghmi's own send does with any error.
    """
    if hasattr(sock, "fd"):  # eventlet's green socket, as pyghmi handles it
        sock = sock.fd
    try:
        sock.sendto(packet, address)
    except BlockingIOError:
        try:
            select.select((), (sock,), (), SEND_WAIT)
            sock.sendto(packet, address)
        except OSError:
            return
    except OSError:
        return


def _version() -> str:
    """Return the installed pyghmi version, or ``unknown``."""
    try:
        from importlib.metadata import version

        return version("pyghmi")
    except Exception:  # noqa: BLE001 - only for a log field
        return "unknown"


__all__ = ["MAX_WAIT", "SEND_WAIT", "apply", "is_applied", "send_nonblocking"]
