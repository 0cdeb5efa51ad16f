"""``cidcapt --console NODE``: a node's serial-over-LAN console, relayed by cidd (admin only).

cidd holds the BMC credentials and talks SOL to the BMC; this side only moves bytes between the terminal and
the session (``console_data`` messages, base64). ``~.`` at the start of a line detaches, like ipmitool and
ssh; ``~~`` sends one ``~``. End of input also detaches.
"""

from __future__ import annotations

import base64
import contextlib
import os
import selectors
import sys
import termios
import tty
from collections.abc import Iterator
from typing import BinaryIO, TextIO

from cidcapt.connection import Connection
from cidcapt.errors import ConnectionLost

ESCAPE_HELP = "~. detaches, ~~ sends ~"


class EscapeScanner:
    """Finds the detach sequence ``~.`` at the start of a line in what the user types."""

    def __init__(self) -> None:
        self._line_start = True
        self._tilde = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Return (the bytes to send, whether the user asked to detach); bytes after ``~.`` are dropped."""
        out = bytearray()
        for value in data:
            char = bytes([value])
            if self._tilde:
                self._tilde = False
                if char == b".":
                    return bytes(out), True
                out += b"~" if char == b"~" else b"~" + char
            elif self._line_start and char == b"~":
                self._tilde = True
                continue
            else:
                out += char
            self._line_start = char in (b"\r", b"\n")
        return bytes(out), False


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Put the terminal ``fd`` in raw mode for the block (nothing happens when it is not a terminal)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def relay(conn: Connection, node: str, in_fd: int, out: BinaryIO, err: TextIO) -> str | None:
    """Relay the open console of ``node`` between ``in_fd``/``out`` and ``conn`` until it ends.

    Returns None when the user detached (``~.`` or end of input) or cidd closed the console cleanly, else
    the reason cidd gave. Raises ConnectionLost when the session breaks.
    """
    scanner = EscapeScanner()
    selector = selectors.DefaultSelector()
    selector.register(in_fd, selectors.EVENT_READ, "in")
    selector.register(conn.sock, selectors.EVENT_READ, "cidd")
    wait = 0.0  # first take what came with the reply (already read from the socket)
    try:
        while True:
            while (message := conn.next_message(wait)) is not None:
                wait = 0.0
                kind = message.get("type")
                if kind == "console_data" and isinstance(message.get("data"), str):
                    out.write(base64.b64decode(message["data"]))
                    out.flush()
                elif kind == "console_closed":
                    reason = message.get("reason")
                    return str(reason) if reason else None
                elif kind == "error":
                    return str(message.get("message") or "cidd refused the console")
            for key, _ in selector.select(timeout=30.0):
                if key.data == "in":
                    data = os.read(in_fd, 4096)
                    send, detach = scanner.feed(data) if data else (b"", True)
                    if send:
                        conn.send({"type": "console_data", "data": base64.b64encode(send).decode("ascii")})
                    if detach:
                        with contextlib.suppress(ConnectionLost):
                            conn.send({"type": "console_close"})
                        return None
            wait = 0.01  # the socket may be readable: read what it has
    finally:
        selector.close()


def run(conn: Connection, node: str, *, in_fd: int | None = None, out: BinaryIO | None = None,
        err: TextIO | None = None) -> str | None:
    """Open ``node``'s console on the session ``conn`` and relay it (see ``relay``); return its end reason.

    Raises what ``Connection.request`` raises when cidd refuses (not admin, unknown node, no BMC access).
    """
    err = err if err is not None else sys.stderr
    in_fd = sys.stdin.fileno() if in_fd is None else in_fd
    out = out if out is not None else sys.stdout.buffer
    answer = conn.request({"type": "console", "node": node})
    print(f"[cidcapt: console of {node} (BMC {answer.get('bmc')}) through cidd; {ESCAPE_HELP}]", file=err,
          flush=True)
    with raw_terminal(in_fd):
        reason = relay(conn, node, in_fd, out, err)
    print(f"\r\n[cidcapt: console of {node} closed{': ' + reason if reason else ''}]", file=err, flush=True)
    return reason
