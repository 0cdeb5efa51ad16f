"""Serial-over-LAN consoles relayed through cidd: pyghmi's SOL console on its own thread, bytes to the client.

The BMC credentials stay on the head node (cidd's 0600 file): an admin's ``cidcapt --console NODE`` talks to
cidd only, and cidd talks IPMI SOL to the node's BMC. Each ``ConsoleRelay`` owns one thread that creates the
pyghmi ``Console``, feeds it what the client typed (a queue filled from the reactor thread) and pumps pyghmi's
events; what the BMC sends comes back to the reactor thread through ``callFromThread``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: ``factory(host, port, user, password, iohandler)`` returns an object with send_data, wait_for_rsp, close.
ConsoleFactory = Callable[[str, int, bytes, bytes, Callable[[Any], None]], Any]
PUMP_S = 0.05  # how long one turn of the console thread waits for BMC packets


def _pyghmi_console(host: str, port: int, user: bytes, password: bytes, iohandler: Callable[[Any], None]) -> Any:
    """Return a pyghmi SOL Console to ``host:port`` (force: take over a SOL session someone left open)."""
    from pyghmi.ipmi.console import Console

    from cidd import pyghmi_io

    pyghmi_io.apply()
    return Console(bmc=host, userid=user, password=password, iohandler=iohandler, port=port, force=True)


class ConsoleRelay:
    """One SOL console of ``node``: ``on_data(bytes)`` gets the node's output, ``on_close(reason)`` its end.

    Both callbacks run on the reactor thread; ``reason`` is None when the client closed it.
    """

    def __init__(self, reactor: Any, node: str, host: str, port: int, user: bytes, password: bytes,
                 on_data: Callable[[bytes], None], on_close: Callable[[str | None], None],
                 factory: ConsoleFactory | None = None) -> None:
        self.node = node
        self.address = f"{host}:{port}"
        self._reactor = reactor
        self._host, self._port, self._user, self._password = host, port, user, password
        self._on_data, self._on_close = on_data, on_close
        self._factory = factory or _pyghmi_console
        self._input: queue.Queue[bytes] = queue.Queue()
        self._stop = threading.Event()
        self._error: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"cidd-console-{node}", daemon=True)

    def start(self) -> None:
        """Start the console thread (it connects to the BMC and activates SOL)."""
        log.info("console.opening", node=self.node, bmc=self.address)
        self._thread.start()

    def write(self, data: bytes) -> None:
        """Send ``data`` (what the admin typed) to the node's serial port."""
        if not self._closed:
            self._input.put(data)

    def close(self) -> None:
        """Close the console (the thread deactivates SOL and ends); ``on_close`` is not called."""
        self._closed = True
        self._stop.set()

    # --- the console thread ---

    def _iohandler(self, data: Any) -> None:
        """pyghmi's callback: bytes/str from the serial port, or a dict with an ``error``."""
        if isinstance(data, dict):
            if data.get("error"):
                self._error = str(data["error"])
                self._stop.set()
            return
        chunk = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
        if chunk:
            self._reactor.callFromThread(self._deliver, chunk)

    def _deliver(self, chunk: bytes) -> None:
        if not self._closed:
            self._on_data(chunk)

    def _run(self) -> None:
        console = None
        try:
            console = self._factory(self._host, self._port, self._user, self._password, self._iohandler)
            while not self._stop.is_set():
                try:
                    while True:
                        console.send_data(self._input.get_nowait())
                except queue.Empty:
                    pass
                console.wait_for_rsp(PUMP_S)
        except Exception as exc:  # pyghmi raises plain exceptions for unreachable BMCs and refused logins
            detail = str(exc).replace(self._password.decode("utf-8", "replace"), "***") if self._password else str(exc)
            self._error = self._error or detail or type(exc).__name__
        finally:
            if console is not None:
                try:
                    console.close()
                except Exception as exc:
                    log.warning("console.close_failed", node=self.node, bmc=self.address, error=str(exc))
            self._reactor.callFromThread(self._ended)

    def _ended(self) -> None:
        reason = None
        if self._error is not None:
            reason = (f"SOL console of {self.node} (BMC {self.address}) failed: {self._error}; check the BMC, "
                      "its SOL settings and the credentials")
        log.info("console.closed", node=self.node, bmc=self.address, reason=reason)
        if not self._closed:
            self._closed = True
            self._on_close(reason)
